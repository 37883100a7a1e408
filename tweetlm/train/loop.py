"""train(cfg): the one training loop, for pretraining on token shards and for fine-tuning (train/sft.py passes
its own train and val batches of conversations), in one process or in each of the processes torchrun starts
(docs/distributed.md).

    tweetlm train --tokens work/tokens --tokenizer work/tokenizer --out runs/tiny --preset tiny --steps 200
    torchrun --standalone --nproc-per-node 2 -m tweetlm train ... --parallel fsdp

Each iteration, in order: maybe evaluate, maybe checkpoint, maybe write samples, stop?, micro-batches
forward/backward, clip, step, log. The run folder RUN/ holds:
    config.toml     the resolved TrainConfig (written before step 0; `--resume` reads it back)
    env.json        git commit, package versions, device, command line
    tokenizer.json  the tokenizer, so RUN/ alone is enough for generate and eval
    checkpoints/    step-NNNNNN/ (tweetlm/artifacts/checkpoint.py): the last K and the best
    metrics.jsonl   one line per log step {step, loss, lr, grad_norm, tokens, tok_per_s, mfu, time} and per
                    evaluation {step, tokens, val_loss, val_bpb}; an MoE run's log steps also hold router_aux,
                    router_z (its load-balancing and z losses, mean over blocks and the step's micro-batches)
                    and expert_load_min / expert_load_max (tokens per expert over the mean, over the step)
    loss.png        train and val loss by step, redrawn at each evaluation
    samples.txt     a few posts written by the model at every samples_every steps and at the end
The loss each step minimizes is the cross-entropy, plus for an MoE model its router losses (model.router_loss():
the MoE blocks keep their last forward's terms); `loss` in metrics.jsonl stays the cross-entropy alone, the figure
val_loss compares with. With several processes, every rank trains on its share of each step's batch (batches.py)
and writes its shards of the checkpoints; only rank 0 writes the rest of RUN/ and prints. A write the file system refuses (read-only
folder, full disk) ends the run with one line naming the file and the cause (`train` translates the OSError);
the last complete checkpoint stays, for `--resume`.
"""

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from tweetlm.artifacts.checkpoint import latest_checkpoint
from tweetlm.artifacts.files import write_text
from tweetlm.artifacts.runs import environment, log_metrics, plot_losses, read_metrics, trim_metrics
from tweetlm.device import autocast, device_name
from tweetlm.errors import UserError
from tweetlm.model.llama import Llama
from tweetlm.model.scoring import evaluate
from tweetlm.model.sizing import flops_per_token, num_params
from tweetlm.model.weights import load_model
from tweetlm.tokenizer.bpe import Tokenizer
from tweetlm.tokenizer.shards import check_tokenizer, open_split, read_index
from tweetlm.train.batches import TokenBatches, val_batches
from tweetlm.train.checkpoint import load_checkpoint, save_checkpoint
from tweetlm.train.config import TrainConfig, check_resume, load_config, to_toml
from tweetlm.train.dist import (agree, all_reduce_sum, barrier, clip_grad_norm, grad_sync, is_main, parallelize,
                                peak_flops, print0, process_group, rank, rank_device, restart_count, seed_everything,
                                world_size)
from tweetlm.train.optim import build_optimizers, lr_multiplier, set_lr


def train(cfg: TrainConfig, *, resume: bool = False, batches=None, val=None) -> dict:
    """Train to cfg.steps or cfg.time_budget; returns the final metrics. `resume` continues RUN from its
    latest checkpoint. `batches` replaces the token-shard stream: any object with next() -> (inputs, targets)
    [B, T] and state_dict() / load_state_dict() (fine-tuning passes conversations with masked targets); with
    several processes it yields this rank's share, as TokenBatches does, and its state is JSON. `val` replaces
    the val windows of the shards: a list of (inputs, targets), this rank's share, as many on every rank.
    With both, cfg.tokens is not read (the tokenizer is then cfg.tokenizer's or init_from's)."""
    device = rank_device(cfg.device)
    # torchrun --max-restarts restarts every process of the job after a failure, with the same command line: the
    # restarted processes continue the run they started, from its latest checkpoint (docs/distributed.md).
    if restart_count() and not resume and (Path(cfg.out) / "config.toml").is_file():
        print0(f"torchrun restart {restart_count()}: {cfg.out} continues from its latest checkpoint, as with --resume")
        resume = True
    with process_group(device, cfg.parallel):
        try:
            return _loop(cfg, _setup(cfg, device, resume=resume, batches=batches, val=val))
        except OSError as e:  # every write of the run (run folder, checkpoints) ends here when the file system refuses
            if isinstance(e, ConnectionError):  # a closed pipe or socket (output piped into head), not RUN's files
                raise
            raise _refused(Path(cfg.out), e) from None


def _refused(run: Path, e: OSError) -> UserError:
    """A write the file system refused, as one line: where, why, and where `--resume` goes on from."""
    last = latest_checkpoint(run)
    then = f"; then --resume continues from {last}" if last else ""
    return UserError(f"cannot write {e.filename or run}: {e.strerror or e}; check that {run} is writable and has free "
                     f"space{then}")


@dataclasses.dataclass(frozen=True)
class _Setup:
    """Everything a run needs before its first step: built by _setup, run by _loop."""

    run: Path
    device: torch.device
    tokenizer: Tokenizer
    model: Llama  # what is saved, sampled from and optimized (under fsdp its parameters are the shards)
    forward: nn.Module  # the model as parallelize wrapped it: (inputs, targets) [B, T] -> mean loss
    optimizers: list[torch.optim.Optimizer]
    batches: Any  # next() -> (inputs, targets) [B, T], this rank's share; state_dict() / load_state_dict()
    val: list[tuple[torch.Tensor, torch.Tensor]]  # this rank's share, as many batches on every rank
    token_bytes: torch.Tensor  # [V] UTF-8 bytes of each token's text, for bits per byte
    grad_accum: int  # micro-batches per step on this rank
    flops_per_step: float
    peak: float | None  # FLOP/s of all the run's devices together; None where unknown
    checkpoint: Path | None  # the one this run resumes from
    step: int  # this and the three below: where the run starts, 0 or the checkpoint's
    train_time: float  # seconds spent training (evaluation and checkpoints not counted)
    tokens_seen: int
    last_val: dict  # the latest evaluation, {"val_loss", "val_bpb"}
    loss: float | None  # the last train loss in metrics.jsonl up to `step`: the final one of a run resumed at its end


def _setup(cfg: TrainConfig, device: torch.device, *, resume: bool, batches, val) -> _Setup:
    """Check the data and RUN, write RUN's files, build the model (loading init_from's or the checkpoint's
    weights), its optimizers, the train and val batches, and print what the run is."""
    seed_everything(cfg.seed, device)
    world, grad_accum = world_size(), cfg.grad_accum_per_rank(world_size())
    run = Path(cfg.out)
    shards = batches is None or val is None  # token shards feed what the caller does not
    if shards and cfg.tokens is None:
        raise UserError("no training data: give token shards from `tweetlm data tokenize` (--tokens)")
    if resume and not (run / "config.toml").is_file():
        raise UserError(f"{run} is not a run folder (no config.toml): drop --resume to start a new run there")
    base, base_tokenizer = load_model(cfg.init_from) if cfg.init_from else (None, None)
    tokenizer = Tokenizer.load(run / "tokenizer.json") if resume else _tokenizer(cfg, base_tokenizer)  # a run keeps its own copy
    if shards:
        index = read_index(cfg.tokens)
        check_tokenizer(index, tokenizer)
        if base_tokenizer is not None and base_tokenizer.hash != tokenizer.hash:
            raise UserError(f"init_from {cfg.init_from} was trained with another tokenizer than {cfg.tokens}: tokenize "
                            f"with that run's tokenizer (`tweetlm data tokenize CORPUS --tokenizer {cfg.init_from}`)")
    # A model started from another run keeps its shape (its vocabulary may be padded past the tokenizer's).
    model_cfg = (dataclasses.replace(base.config, max_seq_len=cfg.model.seq_len) if base is not None
                 else cfg.model.resolve(vocab_size=tokenizer.vocab_size))
    checkpoint = _start_run(run, cfg, tokenizer, device, resume)

    with torch.device("meta"):
        model = Llama(model_cfg)
    model.to_empty(device=device)
    model.init_weights(generator=torch.Generator(device).manual_seed(cfg.seed))  # the same weights on every rank
    if base is not None and checkpoint is None:
        model.load_state_dict(base.state_dict())
    del base
    forward = parallelize(model, parallel=cfg.parallel, device=device, compile=cfg.compile,
                          activation_checkpointing=cfg.activation_checkpointing)
    optimizers = build_optimizers(model, cfg.optim, device)  # after parallelize: under fsdp they hold the shards
    seq_len = cfg.model.seq_len
    if batches is None:
        batches = TokenBatches(open_split(cfg.tokens, "train"), boundary_id=index["boundary_id"], seq_len=seq_len,
                               batch_size=cfg.micro_batch, seed=cfg.seed, rank=rank(), world=world)
        coverage = batches.coverage()
        if coverage == 0:
            raise UserError(f"{cfg.tokens} has no train document followed by {seq_len} tokens: lower model.seq_len or add data")
        print0(f"train data: windows of {seq_len + 1} tokens from a document start cover {coverage:.0%} of the train tokens")
    if val is None:
        val = val_batches(open_split(cfg.tokens, "val"), boundary_id=index["boundary_id"], seq_len=seq_len,
                          batch_size=cfg.micro_batch, max_tokens=cfg.eval.tokens, rank=rank(), world=world)
        if not val:
            raise UserError(f"{cfg.tokens} has no val document followed by {seq_len} tokens: lower model.seq_len or add val data")
    token_bytes = torch.tensor(tokenizer.token_bytes(), device=device)

    step, train_time, tokens_seen, last_val, loss = 0, 0.0, 0, {}, None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizers)
        batches.load_state_dict(state["loader"])
        step, train_time, tokens_seen, last_val = state["step"], state["train_time"], state["tokens"], state["val"]
        loss = next((r["loss"] for r in reversed(read_metrics(run)) if "loss" in r and r["step"] <= step), None)
        print0(f"resumed from {checkpoint} (step {step})")
    model.train()

    flops_per_step = flops_per_token(model_cfg, seq_len) * cfg.batch_tokens
    peak, peak_source = peak_flops(device)
    peak = peak * world if peak else None  # MFU is against all the devices of the run
    processes = f" x {world} processes ({cfg.parallel})" if world > 1 else ""
    experts = (f", {model_cfg.experts} experts, {model_cfg.experts_active} active: {num_params(model_cfg, active=True):,} "
               "active parameters" if model_cfg.experts else "")
    print0(f"model: {num_params(model_cfg):,} parameters ({model_cfg.depth} layers, dim {model_cfg.dim}{experts}); "
           f"{grad_accum} x {cfg.micro_batch} x {seq_len}{processes} = {cfg.batch_tokens:,} tokens per step; "
           f"{device_name(device)}{' each' if world > 1 else ''}, peak {peak / 1e12 if peak else float('nan'):.2f} TFLOP/s ({peak_source})")
    return _Setup(run=run, device=device, tokenizer=tokenizer, model=model, forward=forward, optimizers=optimizers,
                  batches=batches, val=val, token_bytes=token_bytes, grad_accum=grad_accum,
                  flops_per_step=flops_per_step, peak=peak, checkpoint=checkpoint, step=step, train_time=train_time,
                  tokens_seen=tokens_seen, last_val=last_val, loss=loss)


def _loop(cfg: TrainConfig, setup: _Setup) -> dict:
    """The loop, from setup.step to the end; returns the final metrics. Each iteration, in order: maybe evaluate,
    maybe checkpoint, maybe write samples, stop?, micro-batches forward/backward, clip, step, log."""
    run, device, model, forward = setup.run, setup.device, setup.model, setup.forward
    optimizers, batches, grad_accum = setup.optimizers, setup.batches, setup.grad_accum
    step, train_time, tokens_seen, last_val = setup.step, setup.train_time, setup.tokens_seen, setup.last_val
    start_step = step
    moe = model.config.experts > 0
    loss, session_tokens, session_time = setup.loss, 0, 0.0  # tokens/s over this session, first step left out
    bar = tqdm(total=1000, disable=not is_main(), bar_format="{l_bar}{bar}| {remaining} left{postfix}", mininterval=0.5)
    with bar:  # closed however the loop ends, so that an error's one line (a full disk) starts a line of its own
        while True:
            progress = _progress(cfg, step, train_time)
            last = progress >= 1
            bar.update(min(1000, int(1000 * progress)) - bar.n)
            done_before = setup.checkpoint is not None and step == start_step  # this step's eval and checkpoint are already on disk
            evaluated = False
            if (step % cfg.eval.every == 0 or last) and not done_before:
                last_val = evaluate(forward, setup.val, setup.token_bytes, device, reduce=all_reduce_sum)
                evaluated = True
                if is_main():
                    log_metrics(run, {"step": step, "tokens": tokens_seen, **last_val})
                    plot_losses(run)
            if ((step % cfg.checkpoint.every == 0 and step > 0) or last) and not done_before:
                save_checkpoint(run, step=step, model=model, optimizers=optimizers, val=last_val if evaluated else None,
                                keep=cfg.checkpoint.keep, state={"loader": batches.state_dict(), "train_time": train_time,
                                                                 "tokens": tokens_seen, "val": last_val})
            if ((step % cfg.eval.samples_every == 0 and step > 0) or last) and not done_before:
                _write_samples(run, model, setup.tokenizer, step=step, n=cfg.eval.samples, seed=cfg.seed, device=device)
            if last:
                break

            t0 = time.perf_counter()
            set_lr(optimizers, lr_multiplier(_progress(cfg, step + 1, train_time), cfg.optim))
            loss_sum = torch.zeros((), device=device)
            router_sum = 0  # MoE: the router's terms, summed over micro-batches (Llama.router_stats)
            for micro in range(grad_accum):
                inputs, targets = (t.to(device, non_blocking=True) for t in batches.next())
                with grad_sync(forward, micro == grad_accum - 1):
                    with autocast(device):
                        micro_loss = forward(inputs, targets)
                    objective = micro_loss
                    if moe:  # the router's losses and figures, kept by the MoE blocks in this forward
                        objective = objective + model.router_loss()
                        router_sum = router_sum + model.router_stats()
                    (objective / grad_accum).backward()  # ddp and fsdp average over ranks: the mean over the global batch
                loss_sum += micro_loss.detach()
            grad_norm = clip_grad_norm(model.parameters(), cfg.optim.grad_clip)
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            router = _router_metrics(all_reduce_sum(router_sum), cfg.grad_accum) if moe else {}
            loss = all_reduce_sum(loss_sum).item() / cfg.grad_accum  # waits for the device, so dt is the step's real time
            dt = agree(time.perf_counter() - t0)  # rank 0's clock: every rank must see a time budget end on the same step

            step, train_time, tokens_seen = step + 1, train_time + dt, tokens_seen + cfg.batch_tokens
            if step > start_step + 1:
                session_tokens, session_time = session_tokens + cfg.batch_tokens, session_time + dt
            mfu = setup.flops_per_step / dt / setup.peak if setup.peak else None
            if step % cfg.log_every == 0 and is_main():
                log_metrics(run, {"step": step, "loss": loss, "lr": optimizers[0].param_groups[0]["lr"],
                                  "grad_norm": grad_norm.item(), "tokens": tokens_seen, "tok_per_s": cfg.batch_tokens / dt,
                                  "mfu": mfu, "time": train_time, **router})
            bar.set_postfix_str(f"step {step} loss {loss:.3f} {cfg.batch_tokens / dt:,.0f} tok/s"
                                + (f" MFU {mfu:.1%}" if mfu else "")
                                + (f" aux {router['router_aux']:.3f} z {router['router_z']:.2f} load "
                                   f"{router['expert_load_min']:.2f}-{router['expert_load_max']:.2f}" if moe else ""),
                                refresh=False)
    if setup.checkpoint is not None and step == start_step:  # resumed at its end: no step left to run
        print0(f"{run} already finished at step {step}: nothing to do (raise --steps or --time-budget to go on)")
    tok_per_s = session_tokens / session_time if session_time else None
    final = {"step": step, "loss": loss, **last_val, "tokens": tokens_seen, "time": train_time, "tok_per_s": tok_per_s,
             "mfu": tok_per_s * setup.flops_per_step / cfg.batch_tokens / setup.peak if tok_per_s and setup.peak else None}
    print0("done: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in final.items() if v is not None))
    return final


def _router_metrics(stats: torch.Tensor, micro_batches: int) -> dict:
    """An MoE step's router figures from Llama.router_stats summed over its micro-batches (all ranks'):
    [blocks, 2 + E]. The losses are means over blocks and micro-batches; the load is each block's tokens per
    expert over their mean (1.0 everywhere when balanced), its extremes over blocks and experts."""
    load = stats[:, 2:]  # [blocks, E]
    balance = load / load.mean(dim=1, keepdim=True)
    return {"router_aux": stats[:, 0].mean().item() / micro_batches, "router_z": stats[:, 1].mean().item() / micro_batches,
            "expert_load_min": balance.min().item(), "expert_load_max": balance.max().item()}


def _progress(cfg: TrainConfig, step: int, train_time: float) -> float:
    """How far the run is, 0 -> 1: by steps, or by training time (evaluation and checkpoints not counted)."""
    by_steps = step / cfg.steps if cfg.steps else 0.0
    by_time = train_time / (60 * cfg.time_budget) if cfg.time_budget else 0.0
    return max(by_steps, by_time)


@torch.no_grad()
def _write_samples(run: Path, model: Llama, tokenizer: Tokenizer, *, step: int, n: int, seed: int,
                   device: torch.device, max_new_tokens: int = 48, temperature: float = 0.8) -> None:
    """Append n fresh posts (sampled from the boundary token, no KV cache: a few short ones) to RUN/samples.txt.
    Every rank samples (under fsdp each forward needs them all); rank 0 writes."""
    model.eval()
    generator = torch.Generator(device).manual_seed(seed + step)
    ids = torch.full((n, 1), tokenizer.boundary_id, dtype=torch.long, device=device)  # [n, 1]
    for _ in range(max_new_tokens):
        with autocast(device):
            logits = model(ids[:, -model.config.max_seq_len:])[:, -1, :]  # [n, V]
        next_ids = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)  # [n, 1]
        ids = torch.cat([ids, next_ids], dim=1)
    model.train()
    if not is_main():
        return
    texts = []
    for row in ids[:, 1:].tolist():
        end = row.index(tokenizer.boundary_id) if tokenizer.boundary_id in row else len(row)
        texts.append(tokenizer.decode(row[:end]).replace("\n", " "))
    with open(run / "samples.txt", "a") as f:
        f.write(f"step {step}\n" + "".join(f"  - {t}\n" for t in texts))


# ---------------------------------------------------------------- the run folder


def _tokenizer(cfg: TrainConfig, base_tokenizer: Tokenizer | None) -> Tokenizer:
    """--tokenizer, else the one `data tokenize` saved beside the shards, else init_from's."""
    if cfg.tokenizer is not None:
        return Tokenizer.load(cfg.tokenizer)
    if cfg.tokens is not None and (Path(cfg.tokens) / "tokenizer.json").is_file():
        return Tokenizer.load(cfg.tokens)
    if base_tokenizer is not None:
        return base_tokenizer
    raise UserError(f"{cfg.tokens} has no tokenizer.json beside its shards: give the tokenizer they were made with (--tokenizer)")


def _start_run(run: Path, cfg: TrainConfig, tokenizer: Tokenizer, device: torch.device, resume: bool) -> Path | None:
    """Check RUN against `resume`, write config.toml, env.json and tokenizer.json; the checkpoint to resume from.
    Every rank checks (and sees the same files); rank 0 writes, the others wait for it."""
    checkpoint = None
    if resume:
        check_resume(load_config(run / "config.toml"), cfg)
        checkpoint = latest_checkpoint(run)
    elif (run / "config.toml").exists():
        raise UserError(f"{run} already holds a run: pass --resume to continue it, or choose another --out")
    barrier()  # every rank has looked before rank 0 writes
    if is_main():
        _write_run(run, cfg, tokenizer, device, checkpoint, resume)
    barrier()
    return checkpoint


def _write_run(run: Path, cfg: TrainConfig, tokenizer: Tokenizer, device: torch.device, checkpoint: Path | None,
               resume: bool) -> None:
    if resume:
        trim_metrics(run, checkpoint_step=int(checkpoint.name.removeprefix("step-")) if checkpoint else -1)
    run.mkdir(parents=True, exist_ok=True)
    write_text(run / "config.toml", to_toml(cfg))
    tokenizer.save(run)
    write_text(run / "env.json", json.dumps(environment(device_name(device), world_size(), checkpoint), indent=1) + "\n")
