"""Where am I running: the MPI world, its communicator, and failing loudly.

graphc does not implement its own communication: under ``mpiexec`` it uses
mpi4py's ``COMM_WORLD``.  mpi4py is imported only when the process was
launched by an MPI launcher (or when a communicator is asked for), because
importing it initializes MPI.

Failure policy.  In synchronous data-parallel training every rank waits in a
collective for every other rank, so one rank that stops (an exception, a
crash) would leave the others blocked forever.  MPI launchers already kill a
job when a process *dies* without finalizing MPI; what they cannot see is a
Python exception, after which mpi4py's exit handler calls ``MPI_Finalize``
and waits.  So the first time graphc takes the MPI communicator it installs a
``sys.excepthook`` that prints the traceback, labelled with the rank, and
calls ``MPI_Abort`` -- the launcher then stops every rank.  ``guard()`` does
the same for code that catches exceptions itself (a CLI that turns errors
into exit statuses), and a `DistributedStep` aborts when its own local work
raises.  Last, a rank that leaves the program normally while others are still
blocked waiting for it (ranks that ran different numbers of steps, an error
some caller swallowed) would hang the job in MPI_Finalize: `install_exit_check`
(armed by `DistributedStep`) makes an exiting rank notify the others: a rank
waiting for it in one of graphc's collectives then aborts the job with a
message saying so; as a fallback the exiting rank waits at most
GRAPHC_MPI_EXIT_TIMEOUT seconds (default 300) for the others to arrive.
"""
from __future__ import annotations

import atexit
import os
import sys
import time
import traceback
from contextlib import contextmanager

import numpy as np

__all__ = ["DistributedError", "LocalComm", "launched_size", "is_distributed", "get_comm",
           "rank", "size", "is_root", "install_abort_handler", "install_exit_check", "note_progress",
           "wait", "abort", "guard"]

# Environment variables through which launchers announce the world size:
# MPICH/Hydra and Intel MPI (PMI), Open MPI, MVAPICH, PMIx-based launchers.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")


class DistributedError(RuntimeError):
    """Distributed training cannot go on (mismatched ranks, missing MPI, ...)."""


def launched_size() -> int:
    """The world size an MPI launcher announced in the environment (1 when none did)."""
    for var in _SIZE_VARS:
        v = os.environ.get(var)
        if v:
            try:
                return max(int(v), 1)
            except ValueError:
                continue
    return 1


def is_distributed() -> bool:
    """True when this process is one of several ranks started by an MPI launcher."""
    return launched_size() > 1


class LocalComm:
    """A one-rank stand-in for an MPI communicator (the subset graphc uses).

    Lets the data-parallel code run, and be tested, in a plain process
    without mpi4py; every collective is the identity.
    """

    local = True

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    @property
    def rank(self):
        return 0

    @property
    def size(self):
        return 1

    def Allreduce(self, sendbuf, recvbuf, op=None):
        if not _is_in_place(sendbuf):
            np.copyto(_buf(recvbuf), _buf(sendbuf))

    def Iallreduce(self, sendbuf, recvbuf, op=None):
        self.Allreduce(sendbuf, recvbuf, op)
        return _DoneRequest()

    def Bcast(self, buf, root=0):
        pass

    def allgather(self, obj):
        return [obj]

    def bcast(self, obj, root=0):
        return obj

    def Barrier(self):
        pass

    def Ibarrier(self):
        return _DoneRequest()

    def Ibcast(self, buf, root=0):
        return _DoneRequest()

    def Abort(self, errorcode=1):  # pragma: no cover - only a real MPI job aborts
        os._exit(errorcode)


class _DoneRequest:
    def Wait(self):
        pass

    def Test(self):
        return True


def _is_in_place(b) -> bool:
    return b is None or (not isinstance(b, (np.ndarray, list, tuple)) and "IN_PLACE" in repr(b))


def _buf(b):
    return b[0] if isinstance(b, (list, tuple)) else b


_world = None


def get_comm(comm=None):
    """The communicator to use: `comm` if given, MPI's COMM_WORLD under an MPI
    launcher (or when mpi4py is already initialized), else a `LocalComm`.

    Taking the MPI communicator installs the abort-on-exception hook.
    """
    global _world
    if comm is not None:
        return comm
    if _world is not None:
        return _world
    n = launched_size()
    if n > 1 or "mpi4py.MPI" in sys.modules:
        try:
            from mpi4py import MPI
        except ImportError:
            raise DistributedError(
                f"this process was started by an MPI launcher with {n} ranks, but mpi4py is "
                "not installed, so the ranks cannot talk to each other (each would train "
                "alone). Install it with: pip install 'graphc[mpi]'  (mpi4py + an MPI "
                "library, e.g. the mpich wheel)") from None
        _world = MPI.COMM_WORLD
        install_abort_handler(_world)
    else:
        _world = LocalComm()
    return _world


def rank(comm=None) -> int:
    return get_comm(comm).Get_rank()


def size(comm=None) -> int:
    return get_comm(comm).Get_size()


def is_root(comm=None) -> bool:
    """True on rank 0 (and in a plain single process)."""
    return rank(comm) == 0


def abort(message: str = "", comm=None, exc: BaseException | None = None, code: int = 1):
    """Print `message` (and `exc`'s traceback) labelled with the rank, then stop
    every rank of the job with MPI_Abort.  Never returns on a real MPI job."""
    comm = get_comm(comm)
    r, n = comm.Get_rank(), comm.Get_size()
    lines = [f"[graphc.distributed] rank {r} of {n}: {message or 'error'}"]
    if exc is not None:
        lines.append("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                     .rstrip())
    lines.append(f"[graphc.distributed] rank {r} of {n}: aborting the whole job "
                 f"(MPI_Abort, exit code {code}) so that the other ranks do not wait for it")
    try:
        sys.stdout.flush()
    except Exception:
        pass
    print("\n".join(lines), file=sys.stderr, flush=True)
    if getattr(comm, "local", False) or n == 1:
        if exc is not None:
            raise exc
        raise DistributedError(message)
    time.sleep(0.2)   # let the launcher forward the message before it tears the job down
    comm.Abort(code)


_hooked = set()


def install_abort_handler(comm=None) -> None:
    """Make an uncaught exception on any rank abort the whole MPI job (idempotent)."""
    comm = get_comm(comm) if comm is None else comm
    if getattr(comm, "local", False) or id(comm) in _hooked:
        return
    _hooked.add(id(comm))
    previous = sys.excepthook

    def hook(etype, value, tb):
        if issubclass(etype, KeyboardInterrupt) or comm.Get_size() == 1:
            return previous(etype, value, tb)
        abort(f"uncaught {etype.__name__}: {value}", comm, value)

    sys.excepthook = hook


_EXIT_TAG = 2718                  # tag of the "I have reached the end" notices
_exit_comms: dict = {}            # id(comm) -> its duplicate carrying exit notices
_progress: dict = {}              # id(comm) -> training steps this rank completed
_exited: dict = {}                # id(comm) -> {rank: steps} of ranks that have ended


def note_progress(comm, steps: int) -> None:
    """Record how many steps this rank finished (reported in exit notices)."""
    _progress[id(comm)] = int(steps)


def _exit_timeout(timeout):
    if timeout is None:
        timeout = float(os.environ.get("GRAPHC_MPI_EXIT_TIMEOUT", "300"))
    return float("inf") if timeout <= 0 else timeout


def install_exit_check(comm=None, timeout: float | None = None) -> None:
    """Make a rank that reaches the end of the program while others still wait
    for it stop the job instead of hanging it.

    At exit this rank sends every other rank a notice ("rank r ended after k
    steps") and then waits for all ranks to arrive.  A rank blocked in one of
    graphc's collectives (`wait`) sees the notice and, if the collective does
    not complete within EXIT_GRACE_S, aborts the job with an explanation.  Fallback, for ranks blocked elsewhere: after
    `timeout` s (default $GRAPHC_MPI_EXIT_TIMEOUT or 300; <= 0: no limit) the
    exiting rank aborts the job itself.

    Collective (it duplicates the communicator): call it on all ranks together.
    """
    comm = get_comm(comm)
    if getattr(comm, "local", False) or comm.Get_size() == 1 or id(comm) in _exit_comms:
        return
    exit_comm = comm.Dup()     # its own context: cannot match a message of the program
    _exit_comms[id(comm)] = exit_comm

    def check():
        t = _exit_timeout(timeout)
        me, n = exit_comm.Get_rank(), exit_comm.Get_size()
        note = np.array([_progress.get(id(comm), -1)], dtype=np.int64)
        sends = [exit_comm.Isend(note, dest=r, tag=_EXIT_TAG) for r in range(n) if r != me]
        req = exit_comm.Ibarrier()
        deadline = time.monotonic() + t
        while not req.Test():
            if time.monotonic() > deadline:
                abort(f"this rank reached the end of the program, but other ranks did not "
                      f"within {t:g} s: they are probably blocked in a collective this rank "
                      "will never join (ranks that ran different numbers of training steps, "
                      "or an error that was caught and turned into a normal exit). Set "
                      "GRAPHC_MPI_EXIT_TIMEOUT to wait longer.", comm)
            time.sleep(0.002)
        buf = np.empty(1, dtype=np.int64)      # everyone arrived: drain the notices
        for _ in range(n - 1 - len(_exited.get(id(comm), {}))):
            exit_comm.Recv(buf, tag=_EXIT_TAG)
        for r in sends:
            r.Wait()
    atexit.register(check)     # runs before mpi4py's own MPI_Finalize handler (LIFO)


def _receive_exit_notices(comm) -> dict:
    """{rank: steps} of the ranks known to have ended (reading new notices)."""
    exited = _exited.setdefault(id(comm), {})
    exit_comm = _exit_comms[id(comm)]
    while exit_comm.Iprobe(tag=_EXIT_TAG):
        from mpi4py import MPI
        st = MPI.Status()
        buf = np.empty(1, dtype=np.int64)
        exit_comm.Recv(buf, tag=_EXIT_TAG, status=st)
        exited[st.Get_source()] = int(buf[0])
    return exited


# After a rank has ended, a collective it took part in still completes on the
# others (its data were sent), at most after a few scheduling delays; one that
# needs it never does.  Waiting this long after a notice tells them apart.
EXIT_GRACE_S = 5.0


def wait(requests, comm=None, what: str = "a collective") -> None:
    """Wait for MPI requests, aborting the job if they wait for a rank that ended."""
    comm = get_comm(comm)
    if comm.Get_size() == 1 or id(comm) not in _exit_comms:
        for r in requests:
            r.Wait()
        return
    from mpi4py import MPI
    polls, since = 0, None
    while not MPI.Request.Testall(requests):
        polls += 1
        if polls % 64:
            continue
        exited = _receive_exit_notices(comm)
        if not exited:
            continue
        if since is None:
            since = time.monotonic()
        elif time.monotonic() - since > EXIT_GRACE_S:
            src, steps = next(iter(exited.items()))
            done = f" after {steps} training steps" if steps >= 0 else ""
            mine = _progress.get(id(comm))
            here = f" (this rank has done {mine})" if mine is not None else ""
            abort(f"rank {src} reached the end of the program{done}, while this rank waits "
                  f"for it in {what}{here}: the ranks ran different numbers of steps or "
                  "collectives, so this job can never finish", comm)


@contextmanager
def guard(comm=None):
    """Abort the whole job if the block raises on this rank (multi-rank jobs only).

    For code that would otherwise catch the exception and exit normally, which
    leaves the other ranks blocked in a collective:

        with distributed.guard():
            history = fit(...)
    """
    try:
        yield
    except Exception as e:   # (KeyboardInterrupt reaches every rank through the launcher)
        comm_ = get_comm(comm)
        if comm_.Get_size() > 1:
            abort(f"{type(e).__name__}: {e}", comm_, e)
        raise
