"""Byte-level BPE tokenizers trained locally on text every Python install has, cached by content.

Real-shaped model directories (``relaxrl.models.build``) need a real tokenizer without the hub: a
byte-level BPE like Qwen's or Llama-3's, trained with ``tokenizers`` on the standard library's
``.py``/``.txt``/``.rst`` sources. Deterministic: the file list is sorted and cut at a fixed byte
budget, and the cache key hashes the text itself, so another Python's library trains (and caches)
another tokenizer rather than reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

FORMAT_VERSION = 1  # bump when training changes, to invalidate cached tokenizers
TOKENIZER_FILE = "tokenizer.json"
CORPUS_SUFFIXES = (".py", ".txt", ".rst")
# Test suites are a third of the library and mostly repetitive fixtures; site-packages is not the library.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})

# The pre-tokenizer regexes of the two families (from their tokenizer.json files): they differ in
# digits, one per token for Qwen, up to three for Llama-3.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PATTERNS = {"qwen2": QWEN2_PATTERN, "llama3": LLAMA3_PATTERN}


@dataclass(frozen=True)
class BPESpec:
    """What determines a trained tokenizer (besides the corpus text)."""

    vocab_size: int  # trained tokens, the 256 byte symbols included; special tokens come on top
    corpus_bytes: int  # text budget: whole files in sorted order until this many bytes
    pattern: str = "qwen2"  # pre-tokenizer regex family: qwen2 | llama3
    min_frequency: int = 2

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown BPE pattern {self.pattern!r}; valid: {sorted(PATTERNS)}")
        if self.vocab_size <= 256:
            raise ValueError(f"vocab_size must exceed the 256 byte symbols, got {self.vocab_size}")
        if self.corpus_bytes <= 0:
            raise ValueError(f"corpus_bytes must be > 0, got {self.corpus_bytes}")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(max_bytes: int, root: Optional[Path] = None) -> list[Path]:
    """The standard library's text sources, sorted by relative path, cut after ``max_bytes``."""
    root = Path(root) if root is not None else stdlib_root()
    found: list[Path] = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        found += [Path(directory, f) for f in files if f.endswith(CORPUS_SUFFIXES)]
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    chosen, total = [], 0
    for path in found:
        if total >= max_bytes:
            break
        chosen.append(path)
        total += path.stat().st_size
    if not chosen:
        raise FileNotFoundError(f"no {'/'.join(CORPUS_SUFFIXES)} files under {str(root)!r} to train a tokenizer on")
    return chosen


def read_texts(paths: Sequence[Path]) -> list[str]:
    # errors="replace": a stray non-UTF-8 byte in a library file must not stop the build.
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def content_key(spec: BPESpec, texts: Sequence[str]) -> str:
    """A short hash of the spec, the tokenizers version and the corpus text itself."""
    import tokenizers

    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "spec": asdict(spec), "tokenizers": tokenizers.__version__},
                        sort_keys=True).encode())
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def corpus_key(spec: BPESpec, root: Optional[Path] = None) -> str:
    """``content_key`` of the text ``spec`` would train on (reads it: ~0.2 s for 8 MB)."""
    return content_key(spec, read_texts(corpus_files(spec.corpus_bytes, root)))


def byte_level_tokenizer(pattern: str) -> Tokenizer:
    """An untrained BPE with the family's normaliser, pre-tokenizer and decoder (Qwen2's exact
    pipeline for ``qwen2``: transformers' Qwen2Tokenizer rebuilds the same on loading)."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    if pattern == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERNS[pattern]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(spec: BPESpec, texts: Sequence[str]) -> Tokenizer:
    """A byte-level BPE trained on ``texts`` (no special tokens: callers add their family's)."""
    tok = byte_level_tokenizer(spec.pattern)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=spec.min_frequency,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, seen or not
        special_tokens=[],
    )
    tok.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    return tok


def default_cache_dir() -> Path:
    return Path(os.environ.get("RELAXRL_CACHE", "~/.cache/relaxrl")).expanduser() / "tokenizers"


def cached_bpe(spec: BPESpec, cache_dir: Optional[os.PathLike] = None, root: Optional[Path] = None) -> Tokenizer:
    """``train_bpe`` on the standard library's text, reused from ``cache_dir/<content key>`` when there.

    Written atomically (a temporary directory renamed into place), so concurrent builders and
    interrupted ones never leave a half-written tokenizer that a later run would trust."""
    texts = read_texts(corpus_files(spec.corpus_bytes, root))
    key = content_key(spec, texts)
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = base / key
    if (final / TOKENIZER_FILE).is_file():
        return Tokenizer.from_file(str(final / TOKENIZER_FILE))
    tok = train_bpe(spec, texts)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{key}.tmp-"))
    try:
        tok.save(str(tmp / TOKENIZER_FILE))
        info = {"spec": asdict(spec), "files": len(texts), "chars": sum(map(len, texts))}
        (tmp / "spec.json").write_text(json.dumps(info, sort_keys=True, indent=1))
        try:
            os.rename(tmp, final)  # atomic: a reader sees all of it or nothing
        except OSError:
            if not (final / TOKENIZER_FILE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: same content
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tok
