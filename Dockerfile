# PeftServe server for CUDA hosts (run with the NVIDIA container toolkit: docker run --gpus all ...).
# Build:  docker build -t peftserve .
# Run:    docker run --gpus all -p 8000:8000 -v /models/llama:/model:ro -v peftserve-adapters:/adapters \
#           -e PEFTSERVE__APIKEYS__0=user-key -e PEFTSERVE__ADMINKEYS__0=admin-key \
#           peftserve --model /model --device cuda
# Without API keys the server binds to 127.0.0.1 only (inside the container), so set keys to serve the port.
# The .NET 10 images are Ubuntu 24.04, whose libstdc++ already has GLIBCXX_3.4.32 (TorchSharp needs it).

FROM mcr.microsoft.com/dotnet/sdk:10.0 AS build
# npm fetches the playground's SignalR client (src/PeftServe.Server/package.json) during the build.
RUN apt-get update && apt-get install -y --no-install-recommends nodejs npm && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Directory.Build.props Directory.Packages.props PeftServe.sln ./
COPY src/ src/
# TorchBackend=cuda swaps TorchSharp-cpu for TorchSharp-cuda-linux (libtorch with CUDA).
RUN dotnet publish src/PeftServe.Server/PeftServe.Server.csproj -c Release -p:TorchBackend=cuda -p:UseAppHost=false -o /app

# The native helper (CUDA graphs, native/peftserve_cuda.cpp) against the libtorch TorchSharp-cuda-linux 0.107
# bundles (2.10.0, CUDA 12.8). Without it the server still runs, with eager decode steps.
# (Not built in this repository's CI: it has no container engine.)
FROM nvidia/cuda:12.8.1-devel-ubuntu24.04 AS native
RUN apt-get update && apt-get install -y --no-install-recommends curl unzip g++ && rm -rf /var/lib/apt/lists/*
RUN curl -fsSL -o /tmp/libtorch.zip "https://download.pytorch.org/libtorch/cu128/libtorch-shared-with-deps-2.10.0%2Bcu128.zip" \
 && unzip -q /tmp/libtorch.zip -d /opt && rm /tmp/libtorch.zip
COPY native/ /src/native/
RUN LIBTORCH=/opt/libtorch CUDA_HOME=/usr/local/cuda bash /src/native/build.sh /out

FROM mcr.microsoft.com/dotnet/aspnet:10.0 AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends curl libgomp1 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system peftserve && useradd --system --gid peftserve --home /app peftserve \
 && mkdir -p /adapters && chown peftserve:peftserve /adapters
WORKDIR /app
COPY --from=build /app .
COPY --from=native /out/libpeftserve_cuda.so /app/
USER peftserve
ENV ASPNETCORE_URLS=http://0.0.0.0:8000 \
    PEFTSERVE__ADAPTERSTORE=/adapters \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/adapters"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 CMD curl -fsS http://127.0.0.1:8000/health || exit 1
ENTRYPOINT ["dotnet", "PeftServe.Server.dll"]
