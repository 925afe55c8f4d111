#!/usr/bin/env bash
# Regenerates every stub from proto/. Python stubs (with .pyi for mypy) come from grpcio-tools so
# they match the runtime exactly; Go and TypeScript stubs come from buf.gen.yaml when present.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
gapi=$("$py" -c 'import google.rpc.status_pb2 as m, os; print(os.path.dirname(os.path.dirname(os.path.dirname(m.__file__))))')
mkdir -p .build/proto-deps/google/rpc
cp "$gapi"/google/rpc/status.proto "$gapi"/google/rpc/error_details.proto .build/proto-deps/google/rpc/
rm -rf gen/python && mkdir -p gen/python
mapfile -t files < <(cd proto && find chat -name '*.proto' | sort)
"$py" -m grpc_tools.protoc -Iproto -I"$gapi" \
  --python_out=gen/python --pyi_out=gen/python --grpc_python_out=gen/python "${files[@]/#/proto/}"
# Namespace-free packages so `import chat.gateway.v1.gateway_pb2` works from an installed tree.
find gen/python/chat -type d -exec touch {}/__init__.py \;
