"""`loraloop adapters ...`: the adapter registry for people, over BrokerClient."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loraloop adapters",
        description="Inspect and move LoRA adapter versions held by a loraloop broker.",
        epilog="Selectors: NAME or NAME@latest (newest version), NAME@vN (that version). "
        "The token comes from --token or $LORALOOP_TOKEN.",
    )
    p.add_argument("--broker", default=os.environ.get("LORALOOP_BROKER", "127.0.0.1:50050"),
                   help="broker address host:port (default: $LORALOOP_BROKER or 127.0.0.1:50050)")
    p.add_argument("--token", default=None, help="bearer token (default: $LORALOOP_TOKEN)")
    p.add_argument("--tls-ca", default=os.environ.get("LORALOOP_TLS_CA") or None,
                   help="CA file: speak TLS and verify the broker with it (default: $LORALOOP_TLS_CA, "
                   "which a TLS stack's stack.env sets)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="adapter names, or the versions of one name").add_argument("name", nargs="?")
    sub.add_parser("show", help="the full record of one version").add_argument("selector")
    pull = sub.add_parser("pull", help="write a version as a PEFT directory")
    pull.add_argument("selector")
    pull.add_argument("dir", help="output directory (replaced atomically)")
    push = sub.add_parser("push", help="publish a PEFT directory as the next version (takes the publisher lease)")
    push.add_argument("dir", help="directory with adapter_config.json and adapter_model.safetensors")
    push.add_argument("--name", required=True, help="adapter name")
    g = push.add_mutually_exclusive_group(required=True)
    g.add_argument("--base-model", help="local base model directory: its fingerprint is computed")
    g.add_argument("--base-fingerprint", help="base model fingerprint, as given by the learner")
    push.add_argument("--learner-step", type=int, default=0, help="training step to record (default 0)")
    push.add_argument("--epoch", type=int, default=None,
                      help="publish under this existing epoch instead of taking a new lease")
    for verb in ("pin", "unpin"):
        sub.add_parser(verb, help=f"{verb} a version (pinned versions are kept by retention)").add_argument("selector")
    return p


def _when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from tqdm import tqdm

    from services.broker.client import BrokerClient
    from services.common.errors import LoraloopError
    from services.common.status import code_name

    client = BrokerClient(args.broker, args.token, tls_ca_file=args.tls_ca, timeout_s=args.timeout)
    try:
        if args.cmd == "list" and not args.name:
            rows = client.list_adapters()
            print(f"{'NAME':<32} {'LATEST':>7} {'LIVE':>5} {'EPOCH':>6}")
            for a in rows:
                print(f"{a.name:<32} {'v' + str(a.latest_version):>7} {a.live_versions:>5} {a.publisher_epoch:>6}")
        elif args.cmd == "list":
            records, latest = client.list_versions(args.name)
            print(f"{'VERSION':<9} {'SIZE':>12} {'RANK':>5} {'STEP':>7} {'PIN':>3}  {'CREATED (UTC)':<19}  SHA256")
            for r in records:
                print(f"v{r.version:<8} {r.size_bytes:>12,} {r.rank:>5} {r.learner_step:>7} "
                      f"{'*' if r.pinned else '':>3}  {_when(r.created_at_ms)}  {r.sha256[:16]}")
            print(f"latest: v{latest}")
        elif args.cmd == "show":
            r = client.get(args.selector)
            d = json.loads(r.to_json())
            d["adapter_config_json"] = json.loads(r.adapter_config_json)
            d["pinned"] = r.pinned
            print(json.dumps(d, indent=2))
        elif args.cmd == "pull":
            with tqdm(total=0, unit="B", unit_scale=True, desc="pull", disable=None) as bar:
                def progress(n: int, total: int) -> None:
                    bar.total = total
                    bar.update(n)
                r = client.pull(args.selector, args.dir, progress)
            print(f"{r.ref} -> {args.dir} ({r.size_bytes:,} bytes, sha256 {r.sha256[:16]}…)")
        elif args.cmd == "push":
            from services.common.fingerprint import model_fingerprint
            from services.common.peft_format import WEIGHTS_NAME

            fp = args.base_fingerprint or model_fingerprint(args.base_model)
            size = (Path(args.dir) / WEIGHTS_NAME).stat().st_size
            epoch = args.epoch if args.epoch is not None else client.acquire_publisher(args.name)[0]
            with tqdm(total=size, unit="B", unit_scale=True, desc="push", disable=None) as bar:
                r, dedup = client.publish_dir(args.name, epoch, args.dir, fp, args.learner_step, progress=bar.update)
            print(f"published {r.ref} ({r.size_bytes:,} bytes, rank {r.rank}, epoch {epoch})"
                  + (" [already committed]" if dedup else ""))
        elif args.cmd in ("pin", "unpin"):
            r = (client.pin if args.cmd == "pin" else client.unpin)(args.selector)
            print(f"{args.cmd}ned {r.ref}")
    except LoraloopError as e:  # a broker call failed, or the input was bad (InvalidArgument)
        print(f"loraloop adapters {args.cmd}: {code_name(e)}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"loraloop adapters {args.cmd}: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0
