"""`ffasynth serve` under load: N concurrent uploads of a real-size phantom UWF photo (853x682, the
shared UWF-SLO frames' size) to a page started on 127.0.0.1; reports requests served, errors, the
server process's peak RSS after one request and after the burst, and the wall time.

    python benchmarks/bench_serve_load.py                     # tiny preset, random weights, 20 uploads
    python benchmarks/bench_serve_load.py --pipeline pipelines/mine --requests 40 --steps 20

The server runs as `python -m ffasynth serve` in its own process with its own temp dir, so its
peak RSS (VmHWM) is its own and the script can check that the page's temporary folder is gone once
it is stopped (SIGTERM). Loopback only. Prints one JSON object."""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import TimeoutError, as_completed
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, log, machine, random_pipeline  # noqa: E402

UWF_SIZE = (853, 682)  # width, height of the shared UWF-SLO photos


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def rss_mib(pid: int) -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of a process, MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def write_uwf_photo(path: Path) -> Path:
    """A phantom ultra-widefield photo drawn at the frame's width, cut to its height (PNG)."""
    from PIL import Image

    from ffasynth.data.phantom import make_eye

    width, height = UWF_SIZE
    photo = (make_eye(width, seed=1, style="uwf").photo * 255.0 + 0.5).astype(np.uint8)
    top = (width - height) // 2
    Image.fromarray(photo[top : top + height]).save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="random weights in these shapes")
    parser.add_argument("--pipeline", help="an exported pipeline folder instead of random weights")
    parser.add_argument("--requests", type=int, default=20, help="uploads sent at once")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per request")
    parser.add_argument("--timeout", type=float, default=900, help="seconds the whole burst may take")
    args = parser.parse_args()

    from gradio_client import Client, handle_file

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as scratch:
        scratch = Path(scratch)
        pipeline_dir = Path(args.pipeline) if args.pipeline else scratch / "pipeline"
        if not args.pipeline:
            log(f"building a random {args.preset} pipeline")
            random_pipeline(args.preset).save_pretrained(pipeline_dir)
        photo = write_uwf_photo(scratch / "uwf-photo.png")
        server_tmp = scratch / "server-tmp"
        server_tmp.mkdir()
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        env = {**os.environ, "TMPDIR": str(server_tmp), "GRADIO_ANALYTICS_ENABLED": "False"}
        env.pop("GRADIO_TEMP_DIR", None)
        command = [sys.executable, "-m", "ffasynth", "serve", str(pipeline_dir), "--port", str(port), "--device", "cpu"]
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_http(url, 180)
            (page_folder,) = server_tmp.glob("ffasynth-serve-*")
            client = Client(url, verbose=False, download_files=False)
            idle = rss_mib(server.pid)
            log("one request to warm up")
            started = time.monotonic()
            client.predict(handle_file(str(photo)), args.steps, 0, 1, "early", api_name="/handle")
            single_s = time.monotonic() - started
            after_one = rss_mib(server.pid)

            log(f"{args.requests} uploads at once")
            started = time.monotonic()
            jobs = [
                client.submit(handle_file(str(photo)), args.steps, seed, 1, "early", api_name="/handle")
                for seed in range(args.requests)
            ]
            latencies, errors = [], []
            try:  # in the order the answers arrive (the queue serves them in the order the uploads landed)
                for future in as_completed([job.future for job in jobs], timeout=args.timeout):
                    try:
                        future.result()
                        latencies.append(time.monotonic() - started)
                    except Exception as error:  # each failure is counted and reported by its message
                        errors.append(f"{type(error).__name__}: {error}")
                    answered = len(latencies) + len(errors)
                    log(f"{answered}/{args.requests} answered after {time.monotonic() - started:.0f} s")
            except TimeoutError:
                errors += ["not answered within --timeout"] * (args.requests - len(latencies) - len(errors))
            wall_s = time.monotonic() - started
            after_burst = rss_mib(server.pid)
            client.predict(handle_file(str(photo)), 1, 0, 1, "early", api_name="/handle")  # still serving
            client.close()
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                stderr = server.communicate(timeout=60)[1].decode(errors="replace")
            except subprocess.TimeoutExpired:
                server.kill()
                stderr = "did not stop within 60 s"
        emit(
            {
                "machine": machine(),
                "pipeline": args.pipeline or f"random {args.preset}",
                "image": f"{UWF_SIZE[0]}x{UWF_SIZE[1]} phantom UWF photo, {photo.stat().st_size} bytes",
                "steps": args.steps,
                "server_omp_threads": os.environ.get("OMP_NUM_THREADS"),
                "requests": args.requests,
                "served": len(latencies),
                "errors": errors,
                "wall_s": round(wall_s, 1),
                "single_request_s": round(single_s, 1),
                "latency_median_s": round(statistics.median(latencies), 1) if latencies else None,
                "latency_max_s": round(max(latencies), 1) if latencies else None,
                "server_rss_idle_mib": round(idle["VmRSS"], 0),
                "server_peak_rss_after_one_mib": round(after_one["VmHWM"], 0),
                "server_peak_rss_after_burst_mib": round(after_burst["VmHWM"], 0),
                "server_exit_code": server.returncode,
                "traceback_in_server_log": "Traceback" in stderr,
                "page_folder_removed": not page_folder.exists(),
            }
        )


if __name__ == "__main__":
    main()
