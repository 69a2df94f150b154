"""The actor runtime: the process's actor system, its supervisor, one actor per run, a
client's session, the background-flush ticker and the failed rounds a flush raises.
"""

from actors.runtime._failures import FailureLog, RoundFailure
from actors.runtime._health import session_problems
from actors.runtime._run_actor import RunActor
from actors.runtime._session import Session, SessionConfig
from actors.runtime._supervisor import Supervisor, Ticket
from actors.runtime._system import (
    ActorSystem,
    exit_timeout,
    get_system,
    stop_at_exit,
    ticket_done,
    wait_tickets,
)
from actors.runtime._ticker import Ticker

__all__ = [
    "ActorSystem",
    "FailureLog",
    "RoundFailure",
    "RunActor",
    "Session",
    "SessionConfig",
    "Supervisor",
    "Ticker",
    "Ticket",
    "exit_timeout",
    "get_system",
    "session_problems",
    "stop_at_exit",
    "ticket_done",
    "wait_tickets",
]
