"""The ``replica-router demo`` command: a local cluster, an app, live traffic and faults.

It starts a :class:`~replica_router.testing.LocalCluster` (a primary and streaming
replicas), serves a small notes app over a :class:`ReplicaRouter` with uvicorn on a
free loopback port, and runs a few HTTP clients against it. Every response says
which server answered, so the display counts reads and writes per node from the
clients' side. Then it injects faults in turn and checks that the router saw
each one: replay paused on a replica (it lags and stops getting reads), replay
resumed (it serves again), a replica killed with SIGKILL (it is marked down and
reads continue elsewhere), the replica started again (it is readmitted).

The exit status says whether everything behaved, so a script can run it.

Modules: ``app`` (the notes app and its server), ``records`` (requests, phases,
the router's log), ``scenario`` (traffic, faults, verdicts), ``view`` (the live
table and the summary), ``command`` (``run_demo``).

Example::

    from replica_router._demo import run_demo

    raise SystemExit(run_demo(duration=45.0, replicas=2))
"""

from .app import DemoSetupError
from .command import run_demo

__all__ = ["DemoSetupError", "run_demo"]
