"""Starting and stopping MPI programs: the one module that imports mpi4py.

    mpi_available()            mpi4py importable and an mpiexec to start it with
    INSTALL                    the command that installs both
    world()                    MPI.COMM_WORLD (imports mpi4py)
    stop_everyone_on_error     print an error once and end every rank (comm.Abort)
    run_mpi(args, ranks)       `mpiexec -n ranks python args...` as a subprocess, with a timeout

A rank that raises while the others wait inside a collective would leave
them waiting forever. So a program runs under stop_everyone_on_error: an
error that every rank raised alike (groups.AgreedError) is printed by rank
0 and each rank exits with status 2; any other error is printed with its
rank and comm.Abort ends the whole job within moments.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from moe_np.parallel.groups import AgreedError

INSTALL = "python -m pip install -r requirements-mpi.txt   (or: pip install mpi4py mpich)"
USAGE_EXIT = 2
# one thread per library in each rank, and MPICH's waiting ranks yield the core at every
# poll: with more ranks than cores, a spinning rank would hold the core its peer needs
QUIET_THREADS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                 "NUMBA_NUM_THREADS": "1", "MPIR_CVAR_POLLS_BEFORE_YIELD": "1"}


def mpiexec_path() -> str | None:
    """mpiexec next to this Python (pip's mpich puts it there), else on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def mpi_available() -> bool:
    """mpi4py importable (the package only: MPI itself starts when mpi4py.MPI is imported)
    and an mpiexec to launch ranks with."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return mpiexec_path() is not None


def world():
    """The world communicator. Imports mpi4py (raises ImportError naming INSTALL if absent)."""
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise ImportError(f"mpi4py is not installed: {INSTALL}") from err
    return MPI.COMM_WORLD


@contextlib.contextmanager
def stop_everyone_on_error(comm):
    """Run the body; on an error print one line and end every rank (see the module docstring)."""
    try:
        yield
    except AgreedError as err:
        if comm.Get_rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        raise SystemExit(USAGE_EXIT) from None
    except Exception as err:    # noqa: BLE001 - any error on one rank must end all of them
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if os.environ.get("MOE_NP_TRACEBACK") == "1":
            traceback.print_exc()
        print(f"error: rank {comm.Get_rank()} of {comm.Get_size()}: {message}; stopping every "
              f"rank", file=sys.stderr, flush=True)
        sys.stdout.flush()
        comm.Abort(USAGE_EXIT)


def run_mpi(args: list, ranks: int, timeout: float = 60.0, cwd=None, env=None):
    """subprocess.run of `mpiexec -n ranks python *args` (one BLAS thread per rank, since ranks
    share the cores); raises subprocess.TimeoutExpired after `timeout` seconds."""
    exe = mpiexec_path()
    if exe is None:
        raise FileNotFoundError(f"mpiexec not found: {INSTALL}")
    full_env = dict(os.environ) | QUIET_THREADS | (env or {})
    root = str(Path(__file__).resolve().parents[2])
    full_env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [full_env.get("PYTHONPATH")] if p])
    return subprocess.run([exe, "-n", str(ranks), sys.executable, *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=full_env)


def run_fence(code: str, committed: str, name: str, timeout: float = 300.0) -> None:
    """Run a chapter fence that starts with `# mpiexec -n N` as a script on N ranks and print
    what it printed. Without mpi4py or mpiexec, print the chapter's committed output instead
    (and say so on stderr), so the chapter still reads through."""
    ranks = int(code.splitlines()[0].split()[3])
    if not mpi_available():
        print(f"{name}: MPI is not installed ({INSTALL}); showing the committed output",
              file=sys.stderr)
        print(committed, end="")
        _committed_figures(code)
        return
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "fence.py"
        script.write_text(code)
        # `python -m mpi4py script`: an uncaught error on one rank aborts them all
        done = run_mpi(["-m", "mpi4py", str(script)], ranks, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed under mpiexec -n {ranks}:\n{done.stderr[-3000:]}")
    print(done.stdout, end="")


def _committed_figures(code: str) -> None:
    """Copy the committed figures a fence would have written to where it would write them
    (figures/, or $MOE_NP_FIGURES as tutorial.figure_path says)."""
    committed = Path(__file__).resolve().parents[2] / "figures"
    folder = Path(os.environ.get("MOE_NP_FIGURES", committed))
    folder.mkdir(parents=True, exist_ok=True)
    for figure in re.findall(r'figure_path\("([^"]+)"\)', code):
        if (committed / figure).exists() and folder.resolve() != committed.resolve():
            shutil.copyfile(committed / figure, folder / figure)
