"""Load a sentence-transformers BERT model from a weights folder and embed token ids with it.

The folder is laid out as sentence-transformers saves all-MiniLM-L6-v2: `config.json`,
`model.safetensors`, `tokenizer.json`, `sentence_bert_config.json`, `modules.json` and
`1_Pooling/config.json`. `load_model` runs in the zygote before fork(), so it starts no
thread: it runs no forward pass and no tokenization. The instance runs `tokenize` and
`embed_token_ids`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer
from transformers import BertConfig, BertModel

from coldbrew.inference import Truncation, apply_context_policy
from coldbrew.weights import tensors as weight_tensors

WEIGHTS_FILE = "model.safetensors"
# Sequences per forward pass, which bounds the activations: a batch of 32 sequences of
# 256 tokens grew a forked instance by about 250 MB, weight pages included (measured with
# torch 2.13.0 on CPU, one thread).
BATCH_SIZE = 32
# Characters per piece when encoding a long text, about 2,500 tokens of English.
PIECE_CHARS = 10_000
# Characters before which BERT's pre-tokenizer always starts a new word: ASCII whitespace,
# ASCII punctuation, and CJK Unified Ideographs, which BertNormalizer surrounds with spaces.
# Other Unicode spaces are left out: BertNormalizer deletes some characters that Python
# counts as whitespace (U+001C to U+001F), which would join the words around them.
WORD_BOUNDARY = re.compile(r"[ \t\n\r!-/:-@\[-`{-~\u4e00-\u9fff]")
# The pipeline that modules.json must list. This module implements exactly these steps.
EXPECTED_MODULES = ("sentence_transformers.models.Transformer",
                    "sentence_transformers.models.Pooling",
                    "sentence_transformers.models.Normalize")


@dataclass(frozen=True)
class SentenceEmbeddingModel:
    """A tokenizer and a BERT encoder in eval mode, with the limits read from the weights folder."""

    tokenizer: Tokenizer
    encoder: BertModel
    # The context window in tokens, [CLS] and [SEP] included (sentence_bert_config.json).
    max_seq_length: int
    cls_token_id: int
    sep_token_id: int
    pad_token_id: int
    dimensions: int


def load_model(weights_path: str) -> SentenceEmbeddingModel:
    """Build the tokenizer and the encoder from `weights_path`, with the weights memory-mapped.

    Starts no thread itself, so the zygote may call it before fork(). The imports start
    none either when OMP_NUM_THREADS=1, which the platform sets in zygotes.
    """
    folder = Path(weights_path)
    _check_pipeline(folder)
    config = BertConfig.from_json_file(str(_required_file(folder, "config.json")))
    sentence_config = folder / "sentence_bert_config.json"
    max_seq_length = int(_read_json(sentence_config)["max_seq_length"])
    if not 2 <= max_seq_length <= config.max_position_embeddings:
        raise ValueError(f"max_seq_length {max_seq_length} in {sentence_config} must be from 2 "
                         f"to the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")

    tokenizer = _load_tokenizer(folder)
    weights_file = _required_file(folder, WEIGHTS_FILE)
    # In a zygote this puts the weight pages in the page cache on the zygote's account, so
    # no instance's memory cap is charged for them.
    weight_tensors.prefetch(weights_file)
    encoder = _load_encoder(config, weights_file)
    return SentenceEmbeddingModel(
        tokenizer=tokenizer,
        encoder=encoder,
        max_seq_length=max_seq_length,
        cls_token_id=_special_token_id(tokenizer, "[CLS]"),
        sep_token_id=_special_token_id(tokenizer, "[SEP]"),
        pad_token_id=_special_token_id(tokenizer, "[PAD]"),
        dimensions=config.hidden_size,
    )


def _check_pipeline(folder: Path) -> None:
    """Reject a model whose sentence-transformers pipeline differs from mean pooling + L2 norm."""
    modules = _read_json(folder / "modules.json")
    types = tuple(module.get("type") for module in modules)
    if types != EXPECTED_MODULES:
        raise ValueError(f"{folder / 'modules.json'} lists the modules {list(types)}; this loader "
                         f"implements only {list(EXPECTED_MODULES)}")

    pooling = _read_json(folder / "1_Pooling" / "config.json")
    enabled = sorted(key for key, value in pooling.items()
                     if key.startswith("pooling_mode_") and value is True)
    if enabled != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"{folder / '1_Pooling' / 'config.json'} enables {enabled}; this loader "
                         "implements only pooling_mode_mean_tokens")


def _load_tokenizer(folder: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(_required_file(folder, "tokenizer.json")))
    # tokenizer.json ships with truncation and padding at 128 tokens. Turn both off: the
    # context policy needs the full token count, and batches are padded by hand.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _load_encoder(config: BertConfig, weights_file: Path) -> BertModel:
    """Build BertModel on the meta device and assign the memory-mapped tensors to it.

    Building on the meta device allocates no parameter memory and skips the random
    initialisation. `assign=True` makes each parameter the loaded tensor itself, so the
    weights stay in the file's page-cache pages that every forked instance shares.
    """
    with torch.device("meta"):
        encoder = BertModel(config, add_pooling_layer=False)

    tensors = weight_tensors.load(str(weights_file), framework="torch")
    expected = encoder.state_dict().keys()
    missing = sorted(expected - tensors.keys())
    if missing:
        raise ValueError(f"{weights_file} has no tensors named {missing[:5]} "
                         f"({len(missing)} missing); it does not match config.json")
    # The checkpoint also stores the pooler (unused by mean pooling) and position_ids,
    # which transformers 5.25 keeps as a non-persistent buffer. Load only what BertModel
    # expects.
    encoder.load_state_dict({key: tensors[key] for key in expected}, strict=True, assign=True)
    _rebuild_embedding_buffers(encoder, config)

    encoder.eval()
    return encoder


def _rebuild_embedding_buffers(encoder: BertModel, config: BertConfig) -> None:
    """Create the buffers that load_state_dict leaves on the meta device.

    BertEmbeddings (transformers 5.25) registers position_ids and token_type_ids as
    non-persistent buffers, which a state dict never contains. Rebuild them as its
    __init__ does: positions 0..max_position_embeddings-1 and all-zero token types.
    """
    positions = torch.arange(config.max_position_embeddings).expand((1, -1))
    encoder.embeddings.position_ids = positions
    encoder.embeddings.token_type_ids = torch.zeros(positions.size(), dtype=torch.long)

    leftovers = [name for name, tensor in [*encoder.named_parameters(), *encoder.named_buffers()]
                 if tensor.is_meta]
    if leftovers:
        raise RuntimeError(f"tensors {leftovers} have no data after loading; this transformers "
                           f"version ({transformers.__version__}) adds state this loader does "
                           "not rebuild")


def tokenize(model: SentenceEmbeddingModel, texts: list[str],
             policy: str) -> tuple[list[list[int]], list[Truncation]]:
    """Return the token ids to embed for each text and what the context policy cut.

    Raises ContextLengthExceeded for the first text over the window under `error`.
    """
    token_ids: list[list[int]] = []
    truncations: list[Truncation] = []
    for index, text in enumerate(texts):
        ids, truncation = apply_context_policy(encode_text(model, text), model.max_seq_length,
                                               policy, index)
        if truncation is not None:
            # apply_context_policy keeps the first `limit` tokens, which cuts off the final
            # [SEP]. BERT expects [CLS] text [SEP], so the last kept token becomes [SEP]
            # again, as sentence-transformers' own truncation does. The counts stay right:
            # `limit` tokens are kept and the dropped ones are all text tokens.
            ids[-1] = model.sep_token_id
            truncations.append(truncation)
        token_ids.append([int(token) for token in ids])
    return token_ids, truncations


def encode_text(model: SentenceEmbeddingModel, text: str) -> np.ndarray:
    """Return the ids of [CLS], the text's tokens and [SEP], as `tokenizer.encode(text)` does.

    A long text is encoded in pieces, because a tokenizers Encoding takes several hundred
    bytes per token. With tokenizers 0.23.3, a 6 MB input (the gateway's limit) grew the
    process by about 800 MB when encoded whole and by about 60 MB in pieces. Each piece ends
    just before a character at which BERT's pre-tokenizer always starts a new word, so the
    pieces' tokens joined are the whole text's tokens.
    """
    parts = [np.array([model.cls_token_id], dtype=np.int32)]
    for piece in _split_text(text, PIECE_CHARS):
        ids = model.tokenizer.encode(piece, add_special_tokens=False).ids
        parts.append(np.array(ids, dtype=np.int32))
    parts.append(np.array([model.sep_token_id], dtype=np.int32))
    return np.concatenate(parts)


def _split_text(text: str, max_chars: int) -> Iterator[str]:
    start = 0
    while len(text) - start > max_chars:
        boundary = WORD_BOUNDARY.search(text, start + max_chars)
        if boundary is None:
            # NOTE: a text with no boundary character after max_chars stays one piece, so
            # its memory use is not bounded.
            break
        yield text[start:boundary.start()]
        start = boundary.start()
    yield text[start:]


def embed_token_ids(model: SentenceEmbeddingModel, token_ids: list[list[int]]) -> np.ndarray:
    """Return one L2-normalised float32 row per sequence, mean-pooled over its tokens."""
    embeddings = np.empty((len(token_ids), model.dimensions), dtype=np.float32)
    # Longest first, so each batch pads its sequences to similar lengths.
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]), reverse=True)
    with torch.inference_mode():
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            embeddings[batch] = _embed_batch(model, [token_ids[i] for i in batch]).numpy()
    return embeddings


def _embed_batch(model: SentenceEmbeddingModel, token_ids: list[list[int]]) -> torch.Tensor:
    length = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), length), model.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), length), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1

    hidden = model.encoder(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
    # The mean over the real tokens only, as 1_Pooling/config.json specifies, so padding
    # does not change the result.
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled.float(), p=2, dim=1)


def _special_token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {token} token; this loader expects a BERT "
                         "WordPiece tokenizer")
    return int(token_id)


def _required_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; the weights folder must contain the files "
                                "that sentence-transformers saves for all-MiniLM-L6-v2")
    return path


def _read_json(path: Path) -> Any:
    with _required_file(path.parent, path.name).open(encoding="utf-8") as file:
        return json.load(file)
