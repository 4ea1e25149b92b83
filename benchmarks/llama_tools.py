"""llama.cpp's own command-line tools, built once from the llama-cpp-python source distribution
(the same llama.cpp the tests load) and cached: the yardstick of every GGUF claim.

    python benchmarks/llama_tools.py            # build (or find) them; print where and how long

The build is portable (AVX2, no AVX-512/AMX): the native build of this llama.cpp crashes in
its first decode on CPUs with AMX. Takes about 16 minutes on 2 cores; later calls return the
cached binaries at once.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

VERSION = "0.3.36"
TOOLS = ("llama-imatrix", "llama-quantize", "llama-perplexity", "llama-bench")
CACHE = Path(os.environ.get("SNAPPRUNE_LLAMA_TOOLS",
                            Path.home() / ".cache" / "snapprune" / f"llama-tools-{VERSION}"))
PORTABLE = ("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
            "-DGGML_F16C=ON", "-DGGML_BMI2=ON")


def bench(bin_: dict, files: dict[str, Path], rounds: int, log: Path) -> dict:
    """Prefill (512 tokens) and decode (128 tokens) tokens/s of each file by ``llama-bench``
    (2 threads), the files interleaved round after round so that a machine's drift falls on
    all of them alike; each kind's mean, spread and every run."""
    seen: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in files}
    with open(log, "a", encoding="utf-8") as handle:
        for _ in range(rounds):
            for key, path in files.items():
                done = subprocess.run([str(bin_["llama-bench"]), "-m", str(path), "-p", "512",
                                       "-n", "128", "-r", "2", "-t", "2", "-o", "json"],
                                      capture_output=True, text=True, check=True)
                handle.write(done.stdout)
                for row in json.loads(done.stdout):
                    kind = "decode" if row["n_gen"] else "prefill"
                    seen[key][kind].append(float(row["avg_ts"]))
    return {k: {kind: {"mean": statistics.mean(v), "sd": statistics.pstdev(v), "runs": v}
                for kind, v in kinds.items()} for k, kinds in seen.items()}


def _source() -> Path:
    """llama.cpp's source, vendored in the sdist (downloaded from PyPI once)."""
    unpacked = CACHE / f"llama_cpp_python-{VERSION}"
    if (unpacked / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return unpacked / "vendor" / "llama.cpp"
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
                    "--no-deps", "-q", "-d", str(CACHE), f"llama-cpp-python=={VERSION}"],
                   check=True)
    archive = next(CACHE.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(CACHE, filter="data")
    return unpacked / "vendor" / "llama.cpp"


def tools(threads: int = 2) -> dict[str, Path]:
    """``tool name -> binary``, built if not cached."""
    source = _source()
    build = CACHE / "build"
    binaries = {name: build / "bin" / name for name in TOOLS}
    if all(path.is_file() for path in binaries.values()):
        return binaries
    start = time.perf_counter()
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DLLAMA_CURL=OFF",
                    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", *PORTABLE],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "-j", str(threads), "--target", *TOOLS],
                   check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    (CACHE / "build.json").write_text(json.dumps({"seconds": seconds, "threads": threads,
                                                  "version": VERSION}))
    return binaries


def build_seconds() -> float | None:
    record = CACHE / "build.json"
    return json.loads(record.read_text())["seconds"] if record.is_file() else None


if __name__ == "__main__":
    found = tools()
    for name, path in found.items():
        print(f"{name}: {path}")
    seconds = build_seconds()
    if seconds is not None:
        print(f"built in {seconds / 60:.1f} min")
