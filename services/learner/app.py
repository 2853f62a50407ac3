"""The learner process: its training loop (every rank runs it; rank 0 also serves leases and
talks to the broker), run until the configured step count or a stop event.

    start/resume -> publish the current adapter -> repeat:
        rank 0: keep the lease table fed, wait for a batch of groups, collate it
        all:    broadcast the batch, one RL update (FSDP2), gather the adapter
        rank 0: publish it (new version), write metrics, checkpoint every N steps

On resume the learner takes a new publisher epoch and republishes the checkpoint's adapter
as a new version, so rollouts generate with the weights the learner really has, and no
version number is ever reused.

Stopping (`stop` set: SIGTERM/SIGINT from the CLI, `LearnerRank.stop()` under Ray): rank 0
stops waiting for trajectories, every rank leaves the loop at the same step (rank 0's
decision travels with the batch broadcast), and the lease service drains. Rollout servers
are not told training is finished, so a restarted learner picks them up again; work since
the last checkpoint is redone, as after a crash.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from loraloop.v1 import learner_pb2_grpc as pb_grpc
from loraloop.v1 import rollout_pb2 as rpb
from services.common.memory import release_freed_memory
from services.learner.batch import broadcast, collate, comm_device
from services.learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from services.learner.config import LearnerConfig
from services.learner.policy import Policy
from services.learner.trainer import Trainer

log = logging.getLogger(__name__)


def _init_distributed() -> None:
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        # gloo beside nccl: with CPU offload, gradient clipping and the adapter gather run
        # collectives on CPU-resident shards, which nccl cannot (verl does the same).
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")


def _resume_path(cfg: LearnerConfig) -> Path | None:
    r = cfg.checkpoint.resume
    if r == "never":
        return None
    if r == "auto":
        return latest_checkpoint(cfg.run_dir)
    p = Path(r)
    if not (p / "state.json").is_file():
        raise SystemExit(f"--checkpoint.resume={r}: not a checkpoint directory")
    return p


class Coordinator:
    """Rank 0's side: broker, prompts, lease table, gRPC service, metrics."""

    def __init__(self, cfg: LearnerConfig, state: dict | None) -> None:
        from transformers import AutoTokenizer

        from services.broker.client import BrokerClient
        from services.common.fingerprint import model_fingerprint
        from services.common.grpc_server import Registration, ServerThread
        from services.learner.data import PromptStream, load_prompts
        from services.learner.leases import LeaseTable
        from services.learner.metrics import MetricsWriter
        from services.learner.service import ROLES_OF_METHOD, SERVICE, LearnerServicer

        self.cfg = cfg
        self.broker = BrokerClient(cfg.broker, os.environ.get(cfg.token_env), tls=cfg.client_tls)
        self.broker.wait_ready(60)
        self.epoch, self.latest_at_start = self.broker.acquire_publisher(cfg.adapter_name)
        self.fingerprint = model_fingerprint(cfg.model.path)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        vocab = int(json.loads((Path(cfg.model.path) / "config.json").read_text())["vocab_size"])
        self.stream = PromptStream(load_prompts(cfg.data.dataset), seed=cfg.data.seed)
        d = cfg.data
        self.table = LeaseTable(adapter_name=cfg.adapter_name, samples_per_group=d.samples_per_group,
                                groups_per_batch=d.groups_per_step, vocab_size=vocab,
                                max_staleness=cfg.algo.max_staleness, lease_timeout_s=d.lease_deadline_s)
        self.run_id = uuid.uuid4().hex[:12]
        if state:
            self.stream.load_state_dict(state["data"])
            self.table.load_state_dict(state["leases"])
            self.table.expire_leases()
            self.run_id = state["run_id"]
        self.changed = threading.Event()
        sampling = rpb.SamplingParams(max_tokens=d.max_tokens, temperature=d.temperature, top_p=d.top_p,
                                      n=d.samples_per_group, logprobs=True, ignore_eos=d.ignore_eos)
        self.metrics = MetricsWriter(cfg.run_dir)
        self.validator = self._validator(vocab) if cfg.validation.dataset else None
        self.servicer = LearnerServicer(self.table, sampling, d.reward_fn, on_change=self.changed.set,
                                        validator=self.validator)
        self.service = ServerThread([Registration(pb_grpc.add_LearnerServicer_to_server, self.servicer, SERVICE)],
                                    cfg.server, cfg.auth, cfg.tls, ROLES_OF_METHOD, name="learner-grpc")

    def _validator(self, vocab: int):
        from services.learner.data import load_prompts, render
        from services.learner.validation import Validator, ValPrompt

        v, d = self.cfg.validation, self.cfg.data
        prompts = load_prompts(v.dataset)[: v.max_prompts or None]
        rendered = []
        for p in prompts:
            text, ids = render(p, self.tokenizer)
            rendered.append(ValPrompt(p.uid, tuple(ids), text, p.data_source, p.ground_truth, p.extra_info))
        modes = {}
        if v.greedy:
            modes["greedy"] = rpb.SamplingParams(max_tokens=d.max_tokens, temperature=0.0, n=1, logprobs=True)
        if v.samples:
            modes["sampled"] = rpb.SamplingParams(max_tokens=d.max_tokens, temperature=v.temperature, top_p=v.top_p,
                                                  n=v.samples, logprobs=True)
        log.info("validation: %d prompts from %s, modes %s, every %s steps", len(rendered), v.dataset,
                 ", ".join(modes), v.every or "-")

        def done(row: dict) -> None:
            self.metrics.write(row, val=True)
            log.info("validation round %d (step %d, v%d): %s", row["val/round"], row["step"], row["val/version"],
                     " ".join(f"{k[4:]}={row[k]:.3f}" for k in row
                              if k.endswith(("/reward/mean", "/accuracy")) and k.count("/") == 3))

        return Validator(rendered, adapter_name=self.cfg.adapter_name, modes=modes, reward_fn=d.reward_fn,
                         vocab_size=vocab, correct_threshold=v.correct_threshold,
                         lease_timeout_s=d.lease_deadline_s, on_done=done)

    def validate(self, step: int, version: int, final: bool = False) -> None:
        """Start a validation round of `version` (the adapter after `step`) if one is due."""
        v = self.cfg.validation
        if self.validator is None:
            return
        due = (step == 0 and v.before_train) or (final and v.at_end) or (v.every and step > 0 and step % v.every == 0)
        if due and not self.validator.start(step, version):
            log.warning("validation of step %d skipped: the round before it is still out", step)
        elif due:
            self.changed.set()
            self.servicer.notify()

    def start_service(self) -> int:
        port = self.service.start()
        Path(self.cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.cfg.run_dir) / "learner.port").write_text(str(port))
        print(f"loraloop learner serving leases on {self.cfg.server.host}:{port}", flush=True)
        return port

    def publish(self, adapter_dir: Path, step: int) -> int:
        rec, _ = self.broker.publish_dir(self.cfg.adapter_name, self.epoch, adapter_dir, self.fingerprint,
                                         learner_step=step, publish_id=f"{self.run_id}:e{self.epoch}:s{step}")
        self.table.set_version(rec.version)
        return rec.version

    def _feed(self) -> None:
        from services.learner.data import render

        while self.table.wanted() > 0:
            p = self.stream.next_batch(1)[0]
            text, ids = render(p, self.tokenizer)
            self.table.add(p.uid, ids, text, p.data_source, p.ground_truth, p.extra_info)

    def next_groups(self, stop: threading.Event) -> list | None:
        """Block until a batch of groups is accepted (None once `stop` is set); keep the table
        fed meanwhile."""
        last_log = time.monotonic()
        while not stop.is_set():
            self._feed()
            groups = self.table.take_batch(self.cfg.data.groups_per_step)
            if groups is not None:
                return groups
            self.changed.wait(0.5)
            self.changed.clear()
            if time.monotonic() - last_log > 30:
                log.info("waiting for trajectories: %s", self.table.stats())
                last_log = time.monotonic()
        return None

    def record_batch(self, step: int, groups: list) -> None:
        """<run_dir>/consumed.jsonl: the group ids trained at each step (a step redone after a
        restart appears again; its last line is the one that counts)."""
        with open(Path(self.cfg.run_dir) / "consumed.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "groups": [g.group_id for g in groups]}) + "\n")

    def state(self, version: int, trainer: Trainer) -> dict:
        return {"version": version, "epoch": self.epoch, "run_id": self.run_id,
                "scheduler": trainer.scheduler.state_dict(), "kl_coef_now": trainer.kl_coef_now,
                "data": self.stream.state_dict(),
                "leases": self.table.state_dict()}

    def close(self, finished: bool) -> None:
        """Drain the lease service; with `finished`, first let the rollouts hear that training
        is over (they stop asking)."""
        if finished and self.validator is not None and self.validator.running:
            log.info("waiting for the last validation round (up to %.0f s)", self.cfg.validation.wait_end_s)
            if not self.validator.wait(self.cfg.validation.wait_end_s):
                log.warning("the last validation round did not finish in %.0f s", self.cfg.validation.wait_end_s)
        if finished:
            self.servicer.finished = True
            time.sleep(min(2.0, self.cfg.data.lease_deadline_s))
        self.service.stop()
        self.metrics.close()
        self.broker.close()


class Publisher:
    """Rank 0 publishes each new adapter version on a thread of its own while the next step
    trains: writing it, hashing, the upload to the broker and its durable commit (~20 ms on the
    demo, a tenth of its step) leave the step's critical path, and so does the step's metrics
    row (TensorBoard flushes every row).

    Versions stay what the broker assigns: a publisher holds its adapter's epoch, so nobody
    else commits, and the broker numbers versions latest + 1 (the version is checked when the
    commit is acknowledged, and a mismatch stops the learner). The lease table moves to the
    new version when the step ends, as before: leases then ask for it (a rollout waits until
    it has loaded it), staleness counts from it, and samples of it cannot exist until it is
    committed. At most one publish is in flight: the next one, a checkpoint and the end of
    training first wait for it, so versions are committed in order, a checkpoint names a
    committed version, and an error raised by a publish stops the learner at the next step."""

    def __init__(self, coord: Coordinator, policy: Policy) -> None:
        self.coord, self.policy = coord, policy
        self.version = 0  # the last version submitted
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._row: dict | None = None
        self._row_ready = threading.Event()

    def attach_row(self, row: dict) -> None:
        """The metrics row of the step whose version is being published (complete: the thread
        adds only `timing_s/publish`)."""
        self._row = row
        self._row_ready.set()

    def submit(self, sd: dict[str, torch.Tensor], step: int, with_row: bool = True) -> int:
        """Publish `sd` (the adapter after `step`) as the next version; return its number at
        once. With `with_row`, the step's metrics row, handed over by `attach_row`, is written
        once the version is committed."""
        self.wait()
        predicted = self.version + 1 if self.version else None  # the first publish learns it
        if predicted is not None:
            self.coord.table.set_version(predicted)
        self._row, self._row_ready = None, threading.Event()
        if not with_row:
            self._row_ready.set()
        self._thread = threading.Thread(target=self._publish, args=(sd, step, predicted),
                                        name="learner-publish", daemon=True)
        self._thread.start()
        if predicted is None:
            self.wait()
        else:
            self.version = predicted
        return self.version

    def wait(self) -> float:
        """Block until the publish in flight is committed and its row written (re-raising its
        error); seconds waited."""
        t0 = time.perf_counter()
        if self._thread is not None:
            self._row_ready.set()  # a step that ended without a row (stopped) must not hang it
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"publishing {self.coord.cfg.adapter_name}@v{self.version} failed: {err}") from err
        return time.perf_counter() - t0

    def _publish(self, sd: dict[str, torch.Tensor], step: int, predicted: int | None) -> None:
        try:
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                self.policy.write_adapter(sd, tmp)
                version = self.coord.publish(Path(tmp), step)
            if predicted is not None and version != predicted:
                raise RuntimeError(f"the broker committed v{version}, v{predicted} was expected "
                                   "(another publisher under this learner's epoch?)")
            self.version = version
            publish_s = time.perf_counter() - t0
            self._row_ready.wait()
            if self._row is not None:
                self.coord.metrics.write({**self._row, "timing_s/publish": publish_s})
        except BaseException as e:  # handed to the training loop by wait()
            self._error = e


def _publish_adapter(policy: Policy, publisher: Publisher | None, step: int, with_row: bool = True) -> int:
    """Gather the adapter (collective), hand it to rank 0's publisher, share the version."""
    sd = policy.adapter_state_dict()
    version = publisher.submit(sd, step, with_row) if publisher else 0
    if dist.is_initialized():
        t = torch.tensor([version], device=comm_device())
        dist.broadcast(t, 0)
        version = int(t)
    return version


def run(cfg: LearnerConfig, stop: threading.Event | None = None) -> None:
    """Train to `cfg.steps`, or until `stop` is set (see the module docstring)."""
    stop = stop or threading.Event()
    if cfg.release_freed_memory:
        release_freed_memory()
    _init_distributed()
    torch.set_num_threads(cfg.threads)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device = torch.device("cpu")
    if torch.cuda.is_available():  # one GPU per rank (torchrun's LOCAL_RANK)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    policy = Policy(cfg.model, device, critic=cfg.algo.needs_critic)
    trainer = Trainer(policy, cfg.algo, temperature=cfg.data.temperature, max_len=cfg.data.max_tokens)
    ckpt = _resume_path(cfg)
    state = None
    if ckpt is not None:
        state = load_checkpoint(ckpt, policy, trainer.optimizer)
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.kl_coef_now = state.get("kl_coef_now", cfg.algo.kl_coef)
        log.info("resumed from %s (step %d, version %d)", ckpt, state["step"], state["version"])
    start = state["step"] if state else 0
    coord = Coordinator(cfg, state) if rank == 0 else None
    publisher = Publisher(coord, policy) if coord else None
    version = _publish_adapter(policy, publisher, start, with_row=False)
    if coord:
        coord.start_service()
        log.info("step %d: serving adapter %s@v%d (epoch %d)", start, cfg.adapter_name, version, coord.epoch)
        if start == 0:
            coord.validate(0, version)
    finished = False
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            batch = None
            if coord:
                groups = coord.next_groups(stop)
                batch = collate(groups) if groups is not None else None
                if groups is not None:
                    coord.record_batch(step + 1, groups)
            t_wait = time.perf_counter() - t0
            batch = broadcast(batch)
            if batch is None:  # rank 0 was stopped
                log.info("stopped before step %d", step + 1)
                break
            t1 = time.perf_counter()
            metrics = trainer.step(batch)
            t2 = time.perf_counter()
            publish_wait = publisher.wait() if publisher else 0.0  # the previous version is committed
            version = _publish_adapter(policy, publisher, step + 1)
            if coord:
                # The step's critical path ends here: the publish itself runs on (Publisher).
                resp = batch.response_mask.sum(1)
                row = {"step": step + 1, "policy_version": version,
                       "reward/mean": float(batch.rewards.mean()), "reward/max": float(batch.rewards.max()),
                       "response_length/mean": float(resp.mean()),
                       "staleness/mean": float((version - 1 - batch.versions).float().mean()),
                       "rollout/version_min": int(batch.versions.min()), "rollout/version_max": int(batch.versions.max()),
                       **metrics, "timing_s/wait_rollout": t_wait, "timing_s/broadcast": t1 - t0 - t_wait,
                       "timing_s/publish_wait": publish_wait, "timing_s/handoff": time.perf_counter() - t2,
                       "timing_s/step": time.perf_counter() - t0}
                row["perf/tokens_per_s"] = float(batch.attention_mask.sum()) / row["timing_s/step"]
                row.update({f"leases/{k}": v for k, v in coord.table.stats().items()})
                publisher.attach_row(row)
                coord.validate(step + 1, version, final=step + 1 == cfg.steps)
                log.info("step %d v%d reward %.3f pg_loss %.4f kl %.4f %.2fs", step + 1, version,
                         row["reward/mean"], row.get("actor/pg_loss", 0.0), row.get("actor/kl", 0.0),
                         row["timing_s/step"])
            if (step + 1) % cfg.checkpoint.every == 0 or step + 1 == cfg.steps:
                if publisher:
                    publisher.wait()  # the checkpoint names a committed version
                save_checkpoint(cfg.run_dir, step + 1, policy, trainer.optimizer,
                                coord.state(version, trainer) if coord else {}, cfg.checkpoint.keep_last)
        else:
            finished = True
    finally:
        if publisher:
            try:
                publisher.wait()  # the last version and its metrics row
            finally:
                coord.close(finished)
        if dist.is_initialized():
            dist.destroy_process_group()
