"""The training loop: iterations ``start`` .. ``run.iters`` of :func:`train.uda.step.iteration`, with logging,
checkpoints, evaluation, and the stop and abort of :class:`train.engine.signals.StopFlag`.

Randomness is re-seeded from (seed, rank, iteration) at the start of every iteration and batches come
from :class:`train.data.batches.PairedBatches` by iteration number, so ``--resume`` reproduces the
uninterrupted run. Everything a run writes goes under its output folder; rank 0 writes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.errors import InputError
from train.checkpoints.files import find_checkpoint, load_checkpoint
from train.config import TrainConfig, validate
from train.engine.build import Run, build, restore, wrap
from train.engine.context import Context, any_rank, backend_flags, setup_context
from train.engine.loader import batch_loader, checked, shut_down
from train.engine.resume import ResumePoint, check_resume
from train.engine.run_folder import RunFolder, best_eval, claim, default_out, run_lock
from train.engine.signals import StopFlag, signals_blocked
from train.eval.evaluate import evaluate
from train.uda.step import NonFiniteLoss, iteration


def train(cfg: TrainConfig, resume: ResumePoint | Path | None = None, override: bool = False,
          overwrite: bool = False) -> dict[str, Any]:
    """Train (or continue, from a checkpoint file or run folder) with ``cfg``.

    With ``resume``, every setting but the machine's must equal the checkpoint's, unless ``override``
    (then the changes are logged and kept in config.json). The run folder is locked for the whole run;
    an existing run's folder is refused unless resuming it or ``overwrite``.
    """
    validate(cfg)
    ctx = setup_context(cfg.run.device)
    say = tqdm.write if ctx.main else (lambda *_: None)
    if isinstance(resume, Path | str):
        path = find_checkpoint(Path(resume))
        resume = ResumePoint(path, load_checkpoint(path))
    changes: dict[str, list[Any]] = {}
    if resume is not None:
        changes = check_resume(cfg, resume.path, resume.state, override)
        cfg.run.out = cfg.run.out or resume.path.parent.parent
    out = Path(cfg.run.out or default_out(cfg))
    cfg.run.out, cfg.run.device = out, str(ctx.device)  # config.json and checkpoints show resolved values
    with run_lock(out, ctx.main), backend_flags(cfg, ctx.device):
        if ctx.main:
            claim(out, resume and resume.path, overwrite, say)
        run = build(cfg, ctx, say, resuming=resume is not None)
        start = restore(run, resume and resume.state, resume and resume.path, say)
        wrap(run, cfg, ctx)
        folder = RunFolder(out, ctx)
        folder.extra = run.checkpoint_extra()
        folder.open(cfg, start, resume.state.get("config") if resume else None, changes, say)
        try:
            return Loop(cfg, ctx, run, folder, start, resume and resume.path, say).run()
        finally:
            folder.close()


def metrics_record(done: int, terms: dict[str, torch.Tensor], extra: dict[str, float], seconds_per_iter: float,
                   device: torch.device) -> dict[str, Any]:
    """One metrics.jsonl line: lr, total and per-term losses, pseudo-label stats, s/iter, peak GPU memory."""
    record = {"iter": done, "lr": extra["lr"], "loss/total": float(sum(v.detach().float() for v in terms.values())),
              **{f"loss/{k}": float(v.detach().float()) for k, v in terms.items()},
              **{k: v for k, v in extra.items() if k != "lr"}, "time/iter_s": seconds_per_iter}
    if device.type == "cuda":
        record["mem/peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


class Loop:
    """One run's iterations and what happens between them (logging, checkpoints, evaluation, stop)."""

    def __init__(self, cfg: TrainConfig, ctx: Context, run: Run, folder: RunFolder, start: int,
                 resumed: Path | None, say) -> None:
        self.cfg, self.ctx, self.run_, self.folder, self.start, self.say = cfg, ctx, run, folder, start, say
        self.seed = cfg.run.seed + 1_000 * ctx.rank
        self.last_ckpt, self.saved_at = resumed, start
        self.t_last, self.it_last = time.perf_counter(), start
        self.best = best_eval(folder.log_path) if ctx.main else None  # (mIoU, iteration) of checkpoints/best.pt
        self.result: dict[str, Any] = {"out": str(folder.out)}

    def run(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        loader = batch_loader(self.run_.batches, self.start, cfg.run.iters, cfg.data.workers, ctx.device.type == "cuda")
        self.run_.nets.student.train()
        self.say(f"training {'source-only' if cfg.run.source_only else cfg.run.variant} on {ctx.device} "
                 f"({cfg.model.backbone}, {cfg.run.iters} iterations, batch {cfg.run.batch}+"
                 f"{0 if cfg.run.source_only else cfg.run.batch}, crop {cfg.data.crop}) -> {self.folder.out}")
        self.bar = tqdm(total=cfg.run.iters, initial=self.start, desc="train", unit="it", dynamic_ncols=True,
                        disable=not ctx.main)
        with StopFlag() as stop:
            stop.consistent(self.start)
            batches = None
            try:
                with signals_blocked():
                    batches = iter(loader)
                for it, batch in zip(range(self.start, cfg.run.iters), batches, strict=False):
                    if self.one_iteration(stop, it, checked(batch)):
                        break
            except KeyboardInterrupt:  # second signal: keep only a consistent state (see StopFlag)
                stop.ignore()
                if stop.at is not None and stop.at > self.saved_at:
                    self.checkpoint(stop.at)
                self.say(f"aborted; resume with --resume {self.last_ckpt}")
                self.result["stopped"] = stop.at if stop.at is not None else self.saved_at
            finally:
                self.bar.close()
                shut_down(batches)  # an error must end the process, never leave it waiting for its workers
        self.result["checkpoint"] = str(self.last_ckpt) if self.last_ckpt else None
        return self.result

    def one_iteration(self, stop: StopFlag, it: int, batch: dict[str, torch.Tensor]) -> bool:
        """Iteration ``it`` and what follows it; True when a stop was requested (the loop ends)."""
        cfg = self.cfg
        stop.changing()
        terms, metrics = self.step(it, batch)
        done = it + 1
        stop.consistent(done)
        if self.ctx.world > 1:  # a signal to one rank stops every rank after the same iteration
            stop.requested = any_rank(stop.requested, self.ctx.device)
        self.bar.update(1)
        if done % cfg.run.log_every == 0 or done == cfg.run.iters or done == self.start + 1:
            self.log(done, it, terms, metrics)
        if done % cfg.run.ckpt_every == 0 or done == cfg.run.iters:
            self.checkpoint(done)
        if done % cfg.run.eval_every == 0 or done == cfg.run.iters:
            self.result["eval"] = self.evaluate(done)
        if not stop.requested:
            return False
        if self.saved_at != done:
            self.checkpoint(done)
        self.say(f"stopped at iteration {done}; resume with --resume {self.last_ckpt}")
        self.result["stopped"] = done
        return True

    def step(self, it: int, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """:func:`train.uda.step.iteration`, its failures said in one line naming the run."""
        cfg = self.cfg
        try:
            return iteration(cfg, self.run_.method, self.run_.nets, batch, it, self.seed)
        except torch.OutOfMemoryError:
            raise InputError(self.folder.out, f"CUDA out of memory at iteration {it + 1} (backbone "
                             f"{cfg.model.backbone}, batch {cfg.run.batch}, crop {cfg.data.crop}): lower --batch or "
                             "--crop, add --set model.checkpoint=true, or use a smaller --backbone") from None
        except NonFiniteLoss as exc:
            keep = f"last good checkpoint: {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written yet"
            raise InputError(self.folder.out, f"training diverged at iteration {it + 1}: {exc}; stopped ({keep}). "
                             "Lower --lr or check the data.") from None

    def log(self, done: int, it: int, terms: dict[str, torch.Tensor], metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        record = metrics_record(done, terms, metrics, (now - self.t_last) / (done - self.it_last), self.ctx.device)
        self.t_last, self.it_last = now, done
        self.folder.log(record)
        self.bar.set_postfix(loss=f"{record['loss/total']:.3f}", lr=f"{record['lr']:.2e}")

    def checkpoint(self, done: int) -> None:
        self.last_ckpt = self.folder.checkpoint(done, self.run_.nets, self.run_.method, self.cfg) or self.last_ckpt
        self.saved_at = done

    def evaluate(self, done: int) -> dict[str, Any] | None:
        """Night mIoU of the target kind's output (fusion; events for an event-only model); the best so far is
        kept as checkpoints/best.pt."""
        if self.run_.test is None:
            return None
        cfg, amp = self.cfg, self.cfg.run.amp and self.ctx.device.type == "cuda"
        output = self.run_.method.target.output
        res = evaluate(self.run_.nets.student, self.run_.test, self.ctx.device, (output,), amp, progress=False,
                       scale=cfg.data.test_scale)[output]
        if self.best is None or res["mIoU"] > self.best[0]:
            self.best = (res["mIoU"], done)
            self.folder.save_best(done, self.run_.nets, cfg, res["mIoU"])
        self.folder.log({"iter": done, "eval/mIoU": res["mIoU"], "eval/mIoU19": res["mIoU19"],
                         "eval/best_mIoU": self.best[0], "eval/best_iter": self.best[1]})
        self.say(f"iteration {done}: night mIoU {100 * res['mIoU']:.2f} ({res['n_classes']} classes, {output} "
                 f"output); best {100 * self.best[0]:.2f} at iteration {self.best[1]} (checkpoints/best.pt)")
        return res
