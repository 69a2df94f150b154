"""``runactors sweep``: a real hyperparameter sweep logged through :class:`QueueingClient`.

One module per concern: :mod:`.options` (what was asked, constants), :mod:`.store` (the
up-front URI and store checks), :mod:`.data` (the grid and the digits), :mod:`.messages`
(what parent and workers send each other), :mod:`.training` (a trial, in a worker process),
:mod:`.delivery` (how long the client spent delivering), :mod:`.signals` (Ctrl-C),
:mod:`.pool` (the worker processes), :mod:`.board` (the parent's gathered view of trials and
run actors), :mod:`.plain` and :mod:`.live` (the two views), :mod:`.summary` (the outcome),
:mod:`.run` (the sweep in the parent) and :mod:`.command` (the click command).

Importing this package imports nothing heavy: ``runactors --help`` stays fast.
"""
