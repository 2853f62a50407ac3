"""The TRL peer of `loraloop bench peers`: its own virtual environment, its prompts, its run.

TRL pins its own transformers/accelerate/datasets ranges, which need not agree with ours, so
the peer never runs in our interpreter: `ensure_trl_venv` builds a separate venv (default
`~/.cache/loraloop/peer-trl`, or `$LORALOOP_PEER_VENV`) and `run_trl` runs
`services/bench/trl_peer.py` there as a subprocess. Nothing in that venv can touch our pins,
and nothing of ours is importable there: the script is standalone, and what it needs from
loraloop (the prompts, token-identical to ours) crosses over as a JSONL file written by
`write_prompts_jsonl`.

torch is pinned to exactly `TORCH_SPEC` in the same pip command as TRL, so the resolver can
never pick another torch: the pinned release has a local CPU wheel (pip's find-links), any
other would be a multi-GB CUDA download. Stdlib only at import; `write_prompts_jsonl`
imports transformers (our env's) when called.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

TORCH_SPEC = "torch==2.13.0"
TRL_SPEC = "trl==1.16.0"
# What GRPOTrainer + peft import. Left open (pip resolves them against TRL's own ranges);
# torch is in the same command, so resolving them can never move torch.
PEER_REQUIREMENTS: tuple[str, ...] = (TORCH_SPEC, TRL_SPEC, "peft", "transformers", "datasets", "accelerate")
# Pulled in by some resolutions; built against another torch they break `import transformers`
# beside the CPU torch (transformers imports torchvision when it is present).
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
MARKER = "loraloop-peer.json"
SCRIPT = Path(__file__).with_name("trl_peer.py")
DEFAULT_VENV = Path(os.environ.get("LORALOOP_PEER_VENV", "~/.cache/loraloop/peer-trl")).expanduser()
# Checked after install: the imports the script makes, and the versions for the report.
_SMOKE = ("import json, torch, transformers, peft, trl, datasets, accelerate; "
          "print(json.dumps({m.__name__: m.__version__ for m in "
          "(torch, transformers, peft, trl, datasets, accelerate)}))")


def venv_python(path: Path) -> Path:
    return Path(path) / "bin" / "python"


def _marker_spec() -> dict[str, Any]:
    """What the marker must say for a venv to be reused: the requirements and the minor
    Python version of the interpreter that would build it (a venv is tied to its Python)."""
    return {"requirements": list(PEER_REQUIREMENTS), "unwanted": list(UNWANTED),
            "python": f"{sys.version_info.major}.{sys.version_info.minor}"}


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _follow(proc: subprocess.Popen, timeout_s: float, what: str, shown: Callable[[str], bool]) -> list[str]:
    """Read `proc`'s output to its end, print the lines `shown` picks as they come, and
    return every line. Raises RuntimeError with the output's tail on a non-zero exit or
    when `timeout_s` passes (its process group is killed)."""
    tail: collections.deque[str] = collections.deque(maxlen=40)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            lines.append(line)
            tail.append(line)
            if shown(line):
                print(f"  {line}", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        reader.join(5)
        raise RuntimeError(f"{what} did not finish within {timeout_s:.0f} s; last output:\n"
                           + "\n".join(tail)) from None
    reader.join(5)
    if rc != 0:
        raise RuntimeError(f"{what} failed (exit {rc}): {' '.join(map(str, proc.args))}\nlast output:\n"
                           + "\n".join(tail))
    return lines


def _run(cmd: Sequence[str], timeout_s: float, label: str) -> str:
    """Run `cmd` to completion, print its notable lines as they come (pip's `Collecting`,
    `Installing`, `Successfully`), and return its whole output (errors: `_follow`)."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    notable = ("Collecting", "Installing", "Successfully", "Found existing", "ERROR")
    return "\n".join(_follow(proc, timeout_s, label, lambda line: line.startswith(notable)))


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM then SIGKILL to the process group `proc` leads (started with start_new_session,
    so the group is its own and nothing else of ours is in it)."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def ensure_trl_venv(path: Path = DEFAULT_VENV, timeout_s: float = 1800.0) -> Path:
    """The TRL venv's python, building the venv at `path` first unless a marker there says
    it was built with today's `PEER_REQUIREMENTS` (then this returns at once).

    Building: `python -m venv`, one `pip install` of every requirement (torch pinned in the
    same command), `pip uninstall` of `UNWANTED`, then an import check of what the script
    imports; the marker is written last, so an interrupted build is redone next time.
    Takes minutes (a ~200 MB CPU torch wheel plus TRL's dependencies). Raises RuntimeError
    with pip's output tail when a step fails or the whole build passes `timeout_s`."""
    path = Path(path).expanduser()
    python = venv_python(path)
    spec = _marker_spec()
    marker = _read_marker(path)
    if marker is not None and {k: marker.get(k) for k in spec} == spec and python.exists():
        return python
    deadline = time.monotonic() + timeout_s

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"building the TRL venv at {path} took longer than {timeout_s:.0f} s")
        return remaining

    t0 = time.monotonic()
    (path / MARKER).unlink(missing_ok=True)  # a half-updated venv must not look finished
    if not python.exists():
        print(f"creating the TRL peer venv at {path} ...", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "venv", str(path)], left(), "venv")
    print(f"installing {' '.join(PEER_REQUIREMENTS)} into it (minutes) ...", flush=True)
    _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", *PEER_REQUIREMENTS],
         left(), "pip install")
    # `pip uninstall` of a package that is not there only warns (exit 0).
    _run([str(python), "-m", "pip", "uninstall", "-y", *UNWANTED], left(), "pip uninstall")
    out = _run([str(python), "-c", _SMOKE], left(), "import check")
    try:
        versions = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"import check in {path} printed no versions:\n{out[-2000:]}") from None
    if not str(versions.get("torch", "")).startswith(TORCH_SPEC.split("==")[1]):
        raise RuntimeError(f"the TRL venv got torch {versions.get('torch')}, not {TORCH_SPEC}")
    (path / MARKER).write_text(json.dumps({**spec, "versions": versions,
                                           "build_s": round(time.monotonic() - t0, 1)}, indent=1) + "\n")
    print(f"TRL peer venv ready in {time.monotonic() - t0:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    return python


def peer_versions(path: Path = DEFAULT_VENV) -> dict[str, str]:
    """The package versions the venv's marker recorded ({} when there is none)."""
    marker = _read_marker(Path(path).expanduser())
    return dict(marker.get("versions") or {}) if marker else {}


def write_prompts_jsonl(path: Path, model_dir: Path) -> Path:
    """Write the arithmetic demo's prompts as the peer reads them: one row per problem,
    {"prompt", "ground_truth", "prompt_ids"}, rendered by our `render` with the model's
    tokenizer. `prompt` is the rendered text, which TRL tokenises itself (plain completion,
    no chat template, special tokens added: the tiny tokenizer's <bos>); `prompt_ids` are our
    ids, which the script checks TRL's tokenisation against, so the two sides see
    token-identical prompts or the peer refuses to run."""
    from transformers import AutoTokenizer

    from services.learner.data import arithmetic_prompts, render

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in arithmetic_prompts():
            text, ids = render(p, tokenizer)
            f.write(json.dumps({"prompt": text, "ground_truth": p.ground_truth, "prompt_ids": ids}) + "\n")
    return path


def peer_env(threads: int) -> dict[str, str]:
    """The script's environment: ours, minus what would leak our packages into the venv
    (PYTHONPATH, PYTHONHOME, VIRTUAL_ENV), offline for the hub (the model is a local
    directory; nothing may be fetched), and BLAS/OpenMP pools sized to `threads`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_trl(venv_python: Path, model_dir: Path, prompts: Path, out: Path, steps: int, threads: int,
            extra_args: Iterable[str] = (), cpus: set[int] | None = None,
            timeout_s: float = 3600.0, on_start: Callable[[int], object] | None = None) -> list[dict[str, Any]]:
    """Run `trl_peer.py` in the TRL venv and return the rows it wrote to `out` (one per
    step, then the summary row). Pinned to `cpus` (sched_setaffinity in the child before
    exec) when given, so the peer gets exactly the cores our side had. Prints a progress
    line every 10 steps. Raises RuntimeError with the output's tail when the script fails
    or passes `timeout_s` (its process group is killed). `on_start(pid)` is called once the
    script's process exists (e.g. to sample its memory)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [str(venv_python), str(SCRIPT), "--model", str(model_dir), "--prompts", str(prompts),
           "--out", str(out), "--steps", str(steps), "--threads", str(threads), *extra_args]
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=peer_env(threads), preexec_fn=pin, start_new_session=True)
    if on_start is not None:
        on_start(proc.pid)

    def shown(line: str) -> bool:
        """The script prints `trl-peer step N/M ...` after every step: every 10th is shown."""
        parts = line.split()
        if line.startswith("trl-peer step") and len(parts) > 2:
            n, _, total = parts[2].partition("/")
            return n.isdigit() and (int(n) % 10 == 0 or n == total)
        return line.startswith("trl-peer")

    lines = _follow(proc, timeout_s, f"the TRL peer ({steps} steps)", shown)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    if not rows or not rows[-1].get("summary"):
        raise RuntimeError(f"the TRL peer exited 0 but {out} has no summary row; last output:\n"
                           + "\n".join(lines[-40:]))
    return rows
