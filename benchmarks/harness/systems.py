"""What the benchmark measures: the systems (one row each), the peers' pinned venvs, and
the reference every system's tokens are compared with."""

from __future__ import annotations

from dataclasses import dataclass

# -- the peers' environments (exact versions: a rerun measures the same software) ------------

# llama.cpp compiles on install (scikit-build-core + CMake). Only the CPU backend is built,
# without the multimodal library, tests, examples, tools or server: about 6 minutes on 2 cores.


def llama_isa_flags() -> tuple[str, ...]:
    """llama.cpp's x86 kernels named from this CPU's /proc/cpuinfo flags, not -march=native:
    native builds die with SIGILL on the Intel VMs of this machine kind (the hypervisor reports
    AMX, which the compiler then uses), and a fixed AVX-512 build dies on the AMD ones (no
    AVX-512). The same build both benchmarks' llama.cpp use."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    isa = ["-DGGML_NATIVE=OFF"]
    for flag, opt in (("avx", "AVX"), ("avx2", "AVX2"), ("fma", "FMA"), ("f16c", "F16C"), ("avx512f", "AVX512")):
        isa.append(f"-DGGML_{opt}={'ON' if flag in flags else 'OFF'}")
    return tuple(isa)


LLAMA_CMAKE_ARGS = " ".join((
    *llama_isa_flags(), "-DGGML_BLAS=OFF", "-DGGML_OPENMP=ON", "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
))


@dataclass(frozen=True)
class Venv:
    requirements: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    note: str = ""


VENVS: dict[str, Venv] = {
    # The builder imports transformers 5 only names (Qwen3.5, Gemma 4), so it needs
    # transformers 5; torch 2.13.0 resolves to the CPU wheel on this machine's disk (as in
    # constraints.txt). onnxruntime is pinned to the version our runtime uses, so the ORT
    # rows differ only in graph and runtime glue.
    "genai": Venv((
        "onnxruntime-genai==0.18.0", "onnxruntime==1.32.0", "torch==2.13.0", "transformers==5.24.0",
        "onnx==1.23.2", "onnx-ir", "safetensors==0.8.0", "sentencepiece==0.2.3", "protobuf==7.36.2",
        "tqdm", "numpy==2.4.6",
    )),
    "llamacpp": Venv(
        ("llama-cpp-python==0.3.36", "numpy==2.4.6"),
        env=(("CMAKE_ARGS", LLAMA_CMAKE_ARGS), ("CMAKE_BUILD_PARALLEL_LEVEL", "2")),
    ),
    # optimum-onnx 0.1.0 requires transformers < 4.58 (and optimum ~= 2.1).
    "optimum": Venv((
        "optimum-onnx[onnxruntime]==0.1.0", "onnxruntime==1.32.0", "transformers==4.57.6", "torch==2.13.0",
        "onnx==1.23.2", "sentencepiece==0.2.3", "protobuf", "numpy==2.4.6",
    )),
}


@dataclass(frozen=True)
class System:
    name: str
    family: str  # ours | genai | llamacpp | optimum | transformers (also the worker's name)
    precision: str  # what the table shows
    venv: str  # "dev" or a key of VENVS
    label: str  # the table's system column
    compare_to: tuple[str, ...] = ()  # the rows this row is divided by (ours: its peers)
    artifact_of: str | None = None  # runs another system's artifact (ours in genai's loop)
    portable: bool = False  # ours: the contract-exact graph (its sliding layers' cache bounded on CPU)


SYSTEMS: tuple[System, ...] = (
    System("ours-fp32", "ours", "fp32", "dev", "gemma-export", ("genai-fp32", "optimum-fp32", "transformers-fp32")),
    System("ours-int8", "ours", "int8 (MatMulNBits, block 32)", "dev", "gemma-export", ("genai-int8", "optimum-int8")),
    System("ours-int4", "ours", "int4 (MatMulNBits, block 32)", "dev", "gemma-export", ("genai-int4",)),
    System("ours-gguf", "ours", "GGUF blocks (Q4_K_M mix)", "dev", "gemma-export", ("llamacpp-q4_k_m", "genai-int4")),
    System("genai-fp32", "genai", "fp32", "genai", "onnxruntime-genai"),
    System("genai-int8", "genai", "int8 (MatMulNBits, block 32)", "genai", "onnxruntime-genai"),
    System("genai-int4", "genai", "int4 (MatMulNBits, block 32)", "genai", "onnxruntime-genai"),
    # Our artifacts as they are (genai_config.json: the fused graph, shared cache) in genai's C++
    # loop: the same graph as ours-int8 / ours-int4, another generate loop.
    System("ours-int8-genailoop", "genai", "int8 (our artifact)", "genai", "gemma-export artifact, genai's loop",
           ("ours-int8", "genai-int8"), artifact_of="ours-int8"),
    System("ours-int4-genailoop", "genai", "int4 (our artifact)", "genai", "gemma-export artifact, genai's loop",
           ("ours-int4", "genai-int4"), artifact_of="ours-int4"),
    System("llamacpp-q4_k_m", "llamacpp", "GGUF Q4_K_M (same file)", "llamacpp", "llama.cpp (llama-cpp-python)"),
    System("optimum-fp32", "optimum", "fp32", "optimum", "Optimum ONNX + ORTModel"),
    System("optimum-int8", "optimum", "int8 dynamic (QOperator)", "optimum", "Optimum ONNX + ORTModel"),
    System("transformers-fp32", "transformers", "fp32 (reference)", "dev", "transformers (PyTorch eager)"),
)
BY_NAME = {s.name: s for s in SYSTEMS}
REFERENCE = "transformers-fp32"
