#!/usr/bin/env python3
"""The demo's TTS app served by Ray Serve: two replicas, each held to its own memory by qvshim.

The app is the download-free stand-in of examples/leaky_webui.py and cooperative_webui.py: a
"model" held in memory (a buffer with every page written) and text lines turned into audio (a
sine tone, 16-bit PCM). A request asks for `lines` lines of `audio_mib` MiB each, all held until
the WAV is sent, as a batch endpoint does. Each replica's worker process runs under
libqvshim.so with QVSHIM_BUDGET equal to the replica's Ray `memory` (qvshim.ray.runtime_env), so
a request too big for its replica meets MemoryError inside that replica: the replica answers
HTTP 503 with a message, drops what the request held, keeps its process and serves the next
request; the other replica never notices.

    ray start --head --num-cpus=2                       # or let this script start a local Ray
    python examples/ray_serve_tts.py --address auto     # deploys, prints what to try, then waits
    curl -o line.wav 'http://127.0.0.1:8000/tts?text=Hello&lines=2'
    curl -i 'http://127.0.0.1:8000/tts?lines=200&audio_mib=8'    # 503: over the replica's budget
    curl 'http://127.0.0.1:8000/tts/stats'              # the answering replica's pid and budget

--deploy-only deploys and returns (Serve keeps the app on a cluster started with `ray start`).
Needs ray[serve] (python/requirements-ray.txt) and a built libqvshim.so (cargo build --release).
"""

import argparse
import array
import io
import json
import math
import os
import sys
import wave

try:
    import qvshim
except ImportError:
    # Run from a checkout without the companion installed: use the repository's python/.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
    import qvshim
import qvshim.ray

MIB = 1024 * 1024
SAMPLE_RATE_HZ = 24000
DEFAULT_REPLICA_MIB = 384
DEFAULT_MODEL_MIB = 64
DEFAULT_REPLICAS = 2
DEFAULT_ROUTE = "/tts"
DEFAULT_HTTP_PORT = 8000
DEFAULT_APP_NAME = "tts"
DEFAULT_AUDIO_MIB = 1.0
# A request may ask for at most this many lines: a bound on the work, not on memory (the budget
# is what bounds memory).
MAX_LINES = 10000
HTTP_OK = 200
HTTP_BAD_REQUEST = 400
HTTP_SERVICE_UNAVAILABLE = 503


def load_model(size_bytes, seed):
    """A model's weights: one big buffer, every page written as real weights would be."""
    pattern = bytes((seed * 31 + i * 7) & 0xFF for i in range(4096))
    weights = bytearray(size_bytes)
    view = memoryview(weights)
    filled = min(len(pattern), size_bytes)
    view[:filled] = pattern[:filled]
    while filled < size_bytes:
        step = min(filled, size_bytes - filled)
        view[filled : filled + step] = view[:step]
        filled += step
    view.release()
    return weights


def synthesize(text, size_bytes):
    """Audio for one line: a sine tone whose pitch depends on the text, as 16-bit PCM."""
    frequency_hz = 110 + (sum(text.encode()) % 770)
    cycle_samples = max(2, round(SAMPLE_RATE_HZ / frequency_hz))
    one_cycle = array.array(
        "h", (round(12000 * math.sin(2 * math.pi * i / cycle_samples)) for i in range(cycle_samples))
    ).tobytes()
    return one_cycle * max(1, size_bytes // len(one_cycle))


def wav_bytes(parts):
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE_HZ)
        for part in parts:
            wav.writeframes(part)
    return out.getvalue()


def parse_request(params):
    """(text, lines, audio bytes per line) from the query, or raise ValueError saying what is wrong."""
    text = params.get("text", "The quick brown fox reads the batch aloud.")
    try:
        lines = int(params.get("lines", "1"))
        audio_mib = float(params.get("audio_mib", str(DEFAULT_AUDIO_MIB)))
    except ValueError:
        raise ValueError("lines must be a whole number and audio_mib a number") from None
    if not 1 <= lines <= MAX_LINES or not 0 < audio_mib <= 1024:
        raise ValueError(f"lines must be 1..{MAX_LINES} and audio_mib in (0, 1024]")
    return text, lines, int(audio_mib * MIB)


class TTSReplica:
    """One replica: the model, loaded once, and the synthesis endpoint."""

    def __init__(self, model_mib):
        if not qvshim.is_loaded():
            # A replica outside the library would have no budget: better not to serve at all.
            raise RuntimeError("this replica's process is not under libqvshim.so; deploy it with qvshim.ray.runtime_env()")
        self.model = load_model(model_mib * MIB, seed=1)
        self.pid = os.getpid()
        self.served = 0
        self.refused = 0

    def _headers(self):
        return {"X-Replica-Pid": str(self.pid)}

    def _json(self, status, body):
        from starlette.responses import Response

        return Response(json.dumps(body), status_code=status, media_type="application/json", headers=self._headers())

    def stats(self):
        host = qvshim.stats()[0]
        return {"pid": self.pid, "served": self.served, "refused": self.refused, "budget": host["budget"],
                "live": host["live"], "peak": host["peak"], "refusals": host["refusals"]}

    async def __call__(self, request):
        from starlette.responses import Response

        if request.url.path.rstrip("/").endswith("/stats"):
            return self._json(HTTP_OK, self.stats())
        try:
            text, lines, line_bytes = parse_request(request.query_params)
        except ValueError as error:
            return self._json(HTTP_BAD_REQUEST, {"error": str(error), "pid": self.pid})
        parts = []
        try:
            # The batch is held whole until the WAV is built: the shape of a batch endpoint, and
            # what makes a big request big.
            for n in range(lines):
                parts.append(synthesize(f"{n}: {text}", line_bytes))
            body = wav_bytes(parts)
        except MemoryError:
            done = len(parts)
            # Let go of the partial batch before answering, so the next request finds the room.
            parts = None
            self.refused += 1
            budget_mib = qvshim.stats()[0]["budget"] / MIB
            return self._json(HTTP_SERVICE_UNAVAILABLE, {
                "error": f"this replica's memory budget ({budget_mib:.0f} MiB) cannot hold {lines} lines of "
                         f"{line_bytes / MIB:g} MiB (it ran out after {done}); ask for fewer lines",
                "pid": self.pid,
            })
        parts = None
        self.served += 1
        return Response(body, status_code=HTTP_OK, media_type="audio/wav", headers=self._headers())


def build_app(replicas=DEFAULT_REPLICAS, replica_mib=DEFAULT_REPLICA_MIB, model_mib=DEFAULT_MODEL_MIB,
              cpus_per_replica=0.5, gpu_fraction=None, library=None):
    """The Serve application: `replicas` replicas of TTSReplica, each under its own budget."""
    from ray import serve

    memory_bytes = replica_mib * MIB
    # The worker imports qvshim as this driver does: from the same directory when it is a checkout.
    companion_dir = os.path.dirname(os.path.dirname(os.path.abspath(qvshim.__file__)))
    env = qvshim.ray.runtime_env(memory=memory_bytes, gpu_fraction=gpu_fraction, library=library,
                                 env_vars={"PYTHONPATH": companion_dir + ":${PYTHONPATH}"})
    options = {"num_cpus": cpus_per_replica, "memory": memory_bytes, "runtime_env": env}
    if gpu_fraction:
        options["num_gpus"] = gpu_fraction
    deployment = serve.deployment(TTSReplica, name="TTS", num_replicas=replicas, ray_actor_options=options,
                                  max_ongoing_requests=4)
    return deployment.bind(model_mib)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", help="a running Ray cluster (e.g. auto); default: start a local one")
    parser.add_argument("--replicas", type=int, default=DEFAULT_REPLICAS, help=f"replicas ({DEFAULT_REPLICAS})")
    parser.add_argument("--replica-mib", type=int, default=DEFAULT_REPLICA_MIB,
                        help=f"each replica's Ray memory and so its qvshim budget, MiB ({DEFAULT_REPLICA_MIB})")
    parser.add_argument("--model-mib", type=int, default=DEFAULT_MODEL_MIB,
                        help=f"the model each replica holds, MiB ({DEFAULT_MODEL_MIB})")
    parser.add_argument("--gpu-fraction", type=float, help="num_gpus per replica (none by default)")
    parser.add_argument("--route", default=DEFAULT_ROUTE, help=f"HTTP route ({DEFAULT_ROUTE})")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT,
                        help=f"Serve's HTTP port, when this starts Serve ({DEFAULT_HTTP_PORT})")
    parser.add_argument("--library", help="libqvshim.so's path on the nodes (default: found as `python -m qvshim run` does)")
    parser.add_argument("--app-name", default=DEFAULT_APP_NAME, help=f"Serve application name ({DEFAULT_APP_NAME})")
    parser.add_argument("--deploy-only", action="store_true", help="deploy and return instead of waiting")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    ray.init(address=args.address, logging_level="WARNING")
    # Serve keeps the port of its first start; on a cluster where Serve runs already this is a no-op.
    serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
    app = build_app(args.replicas, args.replica_mib, args.model_mib, gpu_fraction=args.gpu_fraction,
                    library=args.library)
    serve.run(app, name=args.app_name, route_prefix=args.route)
    url = f"http://127.0.0.1:{args.http_port}{args.route}"
    print(f"{args.replicas} TTS replicas, each under a {args.replica_mib} MiB qvshim budget, at {url}")
    print(f"  curl -o line.wav '{url}?text=Hello&lines=2'")
    print(f"  curl -i '{url}?lines=200&audio_mib=8'   # over a replica's budget: 503")
    print(f"  curl '{url}/stats'")
    if args.deploy_only:
        return 0
    print("Ctrl-C stops the app")
    try:
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(args.app_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
