"""Serve all-MiniLM-L6-v2 sentence embeddings through OpenAI's `POST /v1/embeddings`.

1. At deploy, the node pulls the weights named `all-minilm-l6-v2` into its cache. The
   handler gets that folder as `context.weights_path`.
2. The zygote imports torch, transformers, tokenizers and numpy, then calls the preload
   hook `app.load_model(weights_path)`. It builds the tokenizer and a BERT encoder whose
   parameters are the memory-mapped tensors of model.safetensors. It starts no thread,
   so fork() is safe, and the instances share the weights' pages.
3. Each forked instance gets that model as `context.preloaded`. In `start_mode="fresh"`
   the instance runs the hook itself in its init phase. Without a hook, `embed` loads
   the model from `context.weights_path` once per instance.
4. The gateway turns `POST /v1/embeddings` with `"model": "all-minilm-l6-v2"` into an
   event: the OpenAI request body plus the spec's `context_policy`. `embed` validates
   it, tokenizes each input, and applies the policy to the 256-token window ([CLS] and
   [SEP] included). It then runs the encoder, takes the mean over the real tokens,
   L2-normalises the result and returns OpenAI's response body.
"""

from __future__ import annotations

import functools
from typing import Any

import coldbrew
from openai_embeddings import build_response, parse_request
from sentence_embedding import SentenceEmbeddingModel, embed_token_ids, load_model, tokenize

# load_model is imported here so that preload_hook="app.load_model" finds it.
__all__ = ["app", "embed", "load_model"]

MODEL_NAME = "all-minilm-l6-v2"

app = coldbrew.App("embed")

# One model per instance when no preload hook built it. The weights path never changes
# within an instance, so a single cache entry is enough.
_load_model_once = functools.lru_cache(maxsize=1)(load_model)


# memory_mb: an instance forked from the zygote grew by about 250 MB (resident and
# virtual) for the largest batch, 32 inputs of 256 tokens, weight pages included. This was
# measured with torch 2.13.0 on a 2-core x86-64 VM. 512 leaves room for large responses.
# NOTE: start_mode="fresh" under a cgroup charges the whole interpreter, which peaked at
# about 710 MB on the same VM, so a fresh-mode copy of this spec needs memory_mb=1024.
@app.function(
    name="embed",
    weights=MODEL_NAME,
    preload=["torch", "transformers", "tokenizers", "numpy"],
    preload_hook="app.load_model",
    model_name=MODEL_NAME,
    memory_mb=512,
    timeout_s=30,
    keep_alive_s=300,
)
def embed(event: Any, context: Any) -> dict[str, Any]:
    """Embed the inputs of an OpenAI embeddings request and return OpenAI's response body."""
    model = _model_for(context)
    request = parse_request(event, model.dimensions)

    token_ids, truncations = tokenize(model, request.inputs, request.context_policy)
    embeddings = embed_token_ids(model, token_ids)

    tokens = sum(len(ids) for ids in token_ids)
    return build_response(request, embeddings, tokens, truncations, MODEL_NAME)


def _model_for(context: Any) -> SentenceEmbeddingModel:
    """Return the model that the preload hook built, or load it from the weights folder."""
    preloaded = context.preloaded
    if preloaded is not None:
        if not isinstance(preloaded, SentenceEmbeddingModel):
            raise TypeError(f"context.preloaded is a {type(preloaded).__name__}, not the "
                            "SentenceEmbeddingModel that app.load_model returns; deploy with "
                            "preload_hook='app.load_model'")
        return preloaded

    if context.weights_path is None:
        raise RuntimeError(f"this function has no weights folder; deploy it with "
                           f"weights={MODEL_NAME!r}")
    return _load_model_once(context.weights_path)
