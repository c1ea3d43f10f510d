"""The benchmark checkpoint as llama.cpp sees it: a real tokenizer.model beside it, then GGUF (cached).

Everything lands under the bench cache ($KLOTSKI_BENCH_CACHE, default ~/.cache/klotski-bench), never
in the repository. Mixtral's SentencePiece model comes from the `mistral-common` wheel on the package
index (Apache-2.0; data/tokenizer.model.v1, 32000 ids): the wheel is downloaded, not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # keep in step with build_llama_cpp.sh
MISTRAL_COMMON = "mistral-common==1.13.1"
TOKENIZER_IN_WHEEL = "mistral_common/data/tokenizer.model.v1"


def cache_dir() -> Path:
    """Where llama.cpp, the tokenizer and the GGUF files live between runs."""
    return Path(os.environ.get("KLOTSKI_BENCH_CACHE", Path.home() / ".cache" / "klotski-bench"))


def mixtral_tokenizer_model(cache: Path, pip: str) -> Path:
    """Mixtral's tokenizer.model, extracted once from the mistral-common wheel."""
    out = cache / "tokenizer" / "mixtral-tokenizer.model.v1"
    if out.is_file():
        return out
    wheels = cache / "src"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [pip, "download", "-q", "--no-deps", "--only-binary", ":all:", MISTRAL_COMMON, "-d", str(wheels)], check=True
    )
    wheel = next(wheels.glob("mistral_common-*.whl"))
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        out.write_bytes(z.read(TOKENIZER_IN_WHEEL))
    return out


def default_checkpoint(cache: Path, tokenizer_model: Path, klotski: str) -> Path:
    """2 layers of Mixtral-8x7B's shapes (about 6.3 GB in bf16) with Mixtral's tokenizer, created once."""
    out = cache / "checkpoints" / "mixtral-8x7b-2l"
    if not (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").is_file():
        subprocess.run(
            [
                klotski,
                "create-model",
                "--family",
                "mixtral",
                "--preset",
                "mixtral-8x7b",
                "--layers",
                "2",
                "--tokenizer-model",
                str(tokenizer_model),
                "--out",
                str(out),
            ],
            check=True,
        )
    return out


def with_tokenizer(checkpoint: Path, tokenizer_model: Path, cache: Path) -> Path:
    """A view of `checkpoint` (weights symlinked) that ships the SentencePiece tokenizer.

    A checkpoint made with `create-model --tokenizer-model` already has one and is returned as is;
    an older one gets a sibling directory, so its 5.6 GB of weights need not be rewritten.
    """
    if (checkpoint / "tokenizer.model").is_file():
        return checkpoint
    from klotski.spm_tokenizer import write_spm_tokenizer
    from klotski.tokenizer import DEFAULT_CHAT_TEMPLATE

    view = cache / "checkpoints" / f"{checkpoint.name}-spm"
    view.mkdir(parents=True, exist_ok=True)
    for f in checkpoint.iterdir():
        if f.suffix == ".safetensors" or f.name.endswith(".safetensors.index.json"):
            link = view / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    config = json.loads((checkpoint / "config.json").read_text())
    special = write_spm_tokenizer(view, tokenizer_model, config["vocab_size"], DEFAULT_CHAT_TEMPLATE)
    ids = {k: special[k] for k in ("bos_token_id", "eos_token_id")}
    (view / "config.json").write_text(json.dumps(config | ids, indent=2))
    (view / "generation_config.json").write_text(json.dumps(ids, indent=2))
    return view


def convert(checkpoint: Path, llama_cpp: Path, outtype: str, cache: Path) -> Path:
    """checkpoint -> GGUF in `outtype` (f16 | bf16) with llama.cpp's converter.

    The converter runs with the gguf-py it ships (its default): it is newer than the `gguf` 0.19.0
    wheel of the same version number (that one lacks LazyChunkedTensor). The pinned wheel brings the
    writer's dependencies and reads the result back in `check`.
    """
    out = cache / "gguf" / f"{checkpoint.name}-{outtype}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    subprocess.run(
        [
            "nice",
            "-n",
            "19",
            sys.executable,
            str(llama_cpp / "convert_hf_to_gguf.py"),
            str(checkpoint),
            "--outtype",
            outtype,
            "--outfile",
            str(partial),
        ],
        check=True,
    )
    shutil.move(partial, out)
    return out


def check(path: Path) -> dict:
    """Read a GGUF back with the pinned `gguf` package: tensor count and the expert tensors' type."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    experts = [t for t in reader.tensors if "ffn_gate_exps" in t.name]
    if not experts:
        raise RuntimeError(f"{path}: no expert tensors; the conversion is not a Mixtral MoE")
    return {"tensors": len(reader.tensors), "expert_type": experts[0].tensor_type.name, "bytes": path.stat().st_size}
