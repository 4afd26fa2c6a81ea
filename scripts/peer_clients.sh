#!/usr/bin/env bash
# Installs the three clients the artifact must open in, each as its users install it, and
# prints where they are (one `name=path` line each on stdout, for tests/clients/):
#   optimum  a venv with optimum-onnx (pins transformers < 4.58, so never the project's venv)
#   genai    onnxruntime-genai, already in the project venv (test extra; it keeps onnxruntime 1.32)
#   tfjs     @huggingface/transformers from npm, run by the machine's Node (>= 20)
#   llamacpp_convert  llama.cpp's convert_hf_to_gguf.py with its conversion/ and gguf-py/, from the
#            llama-cpp-python sdist the benchmarks build (the same llama.cpp), run as its README
#            says from the source tree: `python convert_hf_to_gguf.py` with gguf-py on the path
# Usage: [PROJECT_PY=python] scripts/peer_clients.sh [DIR]   (default: /var/cache/gemma-export-ci/peers when
# writable, so CI's fresh clones reuse it; else .peers in the clone). An install that fails
# exits non-zero naming the client and the reason: the tests never skip a missing client.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DIR=${1:-}
if [ -z "$DIR" ]; then
    DIR=/var/cache/gemma-export-ci/peers
    mkdir -p "$DIR" 2>/dev/null && [ -w "$DIR" ] || DIR=$PWD/.peers
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
fail() { echo "peer_clients.sh: $1" >&2; exit 1; }
log() { echo "peer_clients.sh: $*" >&2; }

# Optimum. The pins are the versions the tests were written against; the venv is rebuilt when
# they change (the stamp holds them).
OPT_REQS="optimum-onnx[onnxruntime]==0.1.0 onnxruntime==1.32.0 transformers==4.57.6 torch==2.13.0 onnx==1.23.2 sentencepiece==0.2.3 numpy==2.4.6"
OPT=$DIR/optimum
if [ "$(cat "$OPT/.stamp" 2>/dev/null)" != "$OPT_REQS" ]; then
    log "installing optimum into $OPT"
    rm -rf "$OPT"
    "$PY" -m venv "$OPT" || fail "optimum: cannot create a venv with $PY"
    # shellcheck disable=SC2086
    "$OPT/bin/python" -m pip install -q $OPT_REQS >"$DIR/optimum-install.log" 2>&1 \
        || fail "optimum: pip install failed: $(tail -1 "$DIR/optimum-install.log")"
    echo "$OPT_REQS" >"$OPT/.stamp"
fi
"$OPT/bin/python" -c "from optimum.onnxruntime import ORTModelForCausalLM" 2>"$DIR/optimum-import.log" \
    || fail "optimum: import failed: $(tail -1 "$DIR/optimum-import.log")"

# transformers.js. ONNXRUNTIME_NODE_INSTALL_CUDA=skip: onnxruntime-node's install script
# otherwise downloads CUDA libraries.
TFJS_VERSION=4.3.2
TFJS=$DIR/tfjs
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null) || fail "tfjs: no node on PATH"
[ "$node_major" -ge 20 ] || fail "tfjs: node $node_major is older than 20"
if [ "$(cat "$TFJS/.stamp" 2>/dev/null)" != "$TFJS_VERSION" ]; then
    log "installing @huggingface/transformers@$TFJS_VERSION into $TFJS"
    rm -rf "$TFJS"
    mkdir -p "$TFJS"
    (cd "$TFJS" && echo '{"name": "gemma-export-peer", "private": true, "type": "module"}' >package.json \
        && ONNXRUNTIME_NODE_INSTALL_CUDA=skip npm install --no-audit --no-fund \
            "@huggingface/transformers@$TFJS_VERSION" >"$DIR/tfjs-install.log" 2>&1) \
        || fail "tfjs: npm install failed: $(tail -1 "$DIR/tfjs-install.log")"
    echo "$TFJS_VERSION" >"$TFJS/.stamp"
fi
(cd "$TFJS" && node -e 'import("@huggingface/transformers").then(() => 0)') 2>"$DIR/tfjs-import.log" \
    || fail "tfjs: import failed: $(tail -1 "$DIR/tfjs-import.log")"

# onnxruntime-genai lives in the project venv (pyproject's test extra; its only pin,
# onnxruntime >= 1.31, leaves the project's 1.32 as it is).
PROJECT_PY=${PROJECT_PY:-.venv/bin/python}
"$PROJECT_PY" -c "import onnxruntime_genai" 2>"$DIR/genai-import.log" \
    || fail "onnxruntime-genai: not importable by $PROJECT_PY: $(tail -1 "$DIR/genai-import.log")"

# llama.cpp's converter (what writes the GGUF files people download), from the sdist on PyPI.
LLAMA_CPP_PYTHON=0.3.36
CONV=$DIR/llamacpp-convert
case "$PROJECT_PY" in /*) ;; *) PROJECT_PY=$(cd "$(dirname "$PROJECT_PY")" && pwd)/$(basename "$PROJECT_PY") ;; esac
if [ "$(cat "$CONV/.stamp" 2>/dev/null)" != "$LLAMA_CPP_PYTHON" ]; then
    log "fetching llama.cpp's converter (llama-cpp-python $LLAMA_CPP_PYTHON sdist) into $CONV"
    rm -rf "$CONV" "$DIR/sdist"
    "$PROJECT_PY" -m pip download -q --no-deps --no-binary :all: -d "$DIR/sdist" \
        "llama-cpp-python==$LLAMA_CPP_PYTHON" >"$DIR/llamacpp-convert-install.log" 2>&1 \
        || fail "llamacpp_convert: pip download failed: $(tail -1 "$DIR/llamacpp-convert-install.log")"
    top=llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp
    mkdir -p "$CONV"
    tar xzf "$DIR/sdist/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$CONV" --strip-components=3 \
        "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py" \
        || fail "llamacpp_convert: the sdist has no $top/convert_hf_to_gguf.py"
    rm -rf "$DIR/sdist"
    echo "$LLAMA_CPP_PYTHON" >"$CONV/.stamp"
fi
(cd "$CONV" && PYTHONPATH=gguf-py "$PROJECT_PY" convert_hf_to_gguf.py --help) >/dev/null 2>"$DIR/llamacpp-convert-import.log" \
    || fail "llamacpp_convert: convert_hf_to_gguf.py --help failed: $(tail -1 "$DIR/llamacpp-convert-import.log")"

echo "optimum=$OPT/bin/python"
echo "tfjs=$TFJS"
echo "llamacpp_convert=$CONV"
