"""`loraloop export BASE ADAPTER OUT [--merge]`: an adapter as a standalone PEFT directory,
or merged into the base as a plain HF model.

ADAPTER is a PEFT directory, a learner checkpoint (`.../step-000010`), or a broker selector
(`policy@v7`, fetched with $LORALOOP_TOKEN from $LORALOOP_BROKER). With --merge the LoRA
weights are fused into the base weights (peft `merge_and_unload`) and the result is saved
with safetensors; a test checks that the weights really changed and that the outputs equal
base + adapter (verl's merger once wrote the base unchanged: verl#7285).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path


def _resolve_adapter(spec: str, work: Path) -> Path:
    p = Path(spec)
    if (p / "adapter" / "adapter_config.json").is_file():
        return p / "adapter"
    if (p / "adapter_config.json").is_file():
        return p
    if "@" in spec or not p.exists():
        from services.broker.client import BrokerClient

        with BrokerClient(os.environ.get("LORALOOP_BROKER", "127.0.0.1:50050")) as c:
            c.pull(spec, work / "pulled")
        return work / "pulled"
    raise SystemExit(f"{spec}: not a PEFT adapter directory, checkpoint, or NAME@vN")


def export(base: str | Path, adapter: str, out: str | Path, merge: bool) -> Path:
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        adir = _resolve_adapter(adapter, Path(tmp))
        if not merge:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy2(adir / name, out / name)
            return out
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, str(adir)).merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="loraloop export", description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="base model directory (HF layout)")
    p.add_argument("adapter", help="PEFT dir, learner checkpoint dir, or broker selector NAME@vN")
    p.add_argument("out", help="output directory")
    p.add_argument("--merge", action="store_true", help="fuse the adapter into the base weights")
    a = p.parse_args(argv)
    out = export(a.base, a.adapter, a.out, a.merge)
    print(f"{'merged model' if a.merge else 'adapter'} written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
