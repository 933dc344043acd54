"""The GPU check of the scfm bundle (`bash .gpu-bundle/gpu-run.sh` runs it).

Runs the bundle's `scfm` and `scfm-worker` against the torch 2.11.0 libraries of the
machine (LD_LIBRARY_PATH = that torch's lib folder) in independent parts, each bounded by
a timeout and all by an overall budget, and writes into $OUT:

- summary.json: per part "ok", "failed" or "skipped" with the reason and the figures;
- gpu-run.log: what this driver did;
- parts.log: the output of every command it ran, one section each.

Parts (in this order): environment, versions (ldd and `scfm-worker versions`), cpu-step,
nccl-check, cuda-step-default, two-workers, worker-kill, cuda-step-large. The CUDA parts
report "skipped: no GPU" where nvidia-smi lists none. The 2-worker parts use NCCL
(`cluster.collective: nccl`, one GPU each through CUDA_VISIBLE_DEVICES) with two GPUs or
more, the ring on CUDA with one GPU (NCCL refuses two ranks on one GPU), and the ring on
CPU without a GPU. Exit status 0 when no part failed, else 1.
"""

import json
import os
import platform
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BUNDLE = Path(__file__).resolve().parent
OUT = Path(os.environ.get("OUT") or BUNDLE / "out")
BUDGET_S = float(os.environ.get("SCFM_GPU_RUN_BUDGET_S", "420"))
T0 = time.monotonic()
WORK = Path(tempfile.mkdtemp(prefix="scfm-gpu-run-"))
SCFM = BUNDLE / "bin" / "scfm"
WORKER = BUNDLE / "bin" / "scfm-worker"
DATA = BUNDLE / "data" / "mouse10k-prepared"

OUT.mkdir(parents=True, exist_ok=True)
_log_file = open(OUT / "gpu-run.log", "w")
_part_logs = []


def log(msg):
    line = f"[gpu-run {time.monotonic() - T0:6.1f}s] {msg}"
    print(line, flush=True)
    _log_file.write(line + "\n")
    _log_file.flush()


def left():
    return BUDGET_S - (time.monotonic() - T0)


def part_log(name):
    p = WORK / f"{name}.log"
    _part_logs.append(p)
    return p


class GpuMemory:
    """Samples nvidia-smi's used memory per GPU every 0.25 s; `peak()` is the highest
    use above the use when sampling began (MiB, per GPU index)."""

    def __init__(self, n_gpus):
        self.n = n_gpus
        self.base, self.high = {}, {}
        self.stop = threading.Event()
        self.thread = None

    def sample(self):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=5,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
        used = {}
        for line in out.splitlines():
            parts = [x.strip() for x in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit():
                try:
                    used[int(parts[0])] = float(parts[1])
                except ValueError:
                    pass
        return used

    def __enter__(self):
        if self.n > 0:
            self.base = self.sample()
            self.high = dict(self.base)

            def loop():
                while not self.stop.wait(0.25):
                    for k, v in self.sample().items():
                        self.high[k] = max(self.high.get(k, 0.0), v)

            self.thread = threading.Thread(target=loop, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread:
            self.thread.join(timeout=6)

    def peak(self):
        return {str(k): round(v - self.base.get(k, 0.0), 1) for k, v in sorted(self.high.items())}


def exited(p):
    """Whether `p` has exited (without reaping it, so that wait4 still gets its usage)."""
    if p.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def kill_group(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def wait_rusage(p, timeout):
    """Waits for `p` up to `timeout` s; returns (exit code or None on timeout, peak RSS
    MiB of that process). A process past its time is killed with its group."""
    end = time.monotonic() + max(timeout, 1)
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return p.returncode, ru.ru_maxrss / 1024.0
        if time.monotonic() > end:
            kill_group(p)
            _, status, ru = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            return None, ru.ru_maxrss / 1024.0
        time.sleep(0.05)


def spawn(cmd, log_path, env, stdout=None):
    """Starts `cmd` in a process group of its own, its stderr (and its stdout unless
    `stdout` says otherwise: a file, or PIPE to read both merged) appended to `log_path`."""
    with open(log_path, "ab") as f:
        f.write(("$ " + " ".join(str(c) for c in cmd) + "\n").encode())
        f.flush()
        if stdout is subprocess.PIPE:
            out, err = subprocess.PIPE, subprocess.STDOUT
        else:
            out, err = stdout or f, f
        return subprocess.Popen(
            [str(c) for c in cmd], stdout=out, stderr=err, env=env, start_new_session=True,
        )


def run(cmd, log_path, env, timeout):
    """Runs `cmd` with its output appended to `log_path`; (exit code or None, peak RSS MiB)."""
    return wait_rusage(spawn(cmd, log_path, env), timeout)


class Skip(Exception):
    """A part that does not apply here (the reason is reported)."""


class Failed(Exception):
    """A part that ran and failed (the reason is reported; figures so far are kept)."""


SUMMARY = {"bundle": None, "machine": {}, "parts": {}, "budget_s": BUDGET_S}
PARTS = []


def part(timeout):
    def deco(f):
        PARTS.append((f.__name__.replace("_", "-"), timeout, f))
        return f
    return deco


def json_file(p):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- setup

def torch_lib():
    if os.environ.get("SCFM_TORCH_LIB"):
        lib = Path(os.environ["SCFM_TORCH_LIB"])
        return lib, None
    r = subprocess.run(
        [sys.executable, "-c", "import torch, os; print(torch.__version__); print(os.path.dirname(torch.__file__))"],
        capture_output=True, text=True, timeout=120,
    )
    if r.returncode != 0:
        return None, r.stderr.strip().splitlines()[-1:] or ["import torch failed"]
    version, folder = r.stdout.strip().splitlines()[-2:]
    return Path(folder) / "lib", version


def gpu_list():
    if not shutil.which("nvidia-smi"):
        return [], "nvidia-smi not found"
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return [], f"nvidia-smi -L: {e}"
    gpus = [line for line in r.stdout.splitlines() if line.startswith("GPU ")]
    return gpus, None if r.returncode == 0 else (r.stderr.strip() or f"exit {r.returncode}")


TORCH_LIB, TORCH_VERSION = torch_lib()
GPUS, GPU_ERR = gpu_list()
N_GPU = len(GPUS)
ENV = dict(os.environ)
if TORCH_LIB:
    ENV["LD_LIBRARY_PATH"] = f"{TORCH_LIB}:{os.environ['LD_LIBRARY_PATH']}" if os.environ.get("LD_LIBRARY_PATH") else str(TORCH_LIB)
ENV.setdefault("RUST_BACKTRACE", "1")
ENV.setdefault("NCCL_DEBUG", "INFO")
CPUS = os.cpu_count() or 2


def need_gpu():
    if N_GPU == 0:
        raise Skip(f"no GPU ({GPU_ERR or 'nvidia-smi lists none'})")


# ----------------------------------------------------------------------------- parts

@part(30)
def environment(res, timeout):
    res.update({
        "python": sys.executable, "python_version": platform.python_version(),
        "torch_version": TORCH_VERSION, "torch_lib": str(TORCH_LIB) if TORCH_LIB else None,
        "glibc": os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None,
        "kernel": platform.release(), "cpus": CPUS, "gpus": GPUS,
    })
    if N_GPU:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )
        res["nvidia_smi"] = r.stdout.strip().splitlines()
    SUMMARY["machine"] = dict(res)
    if TORCH_LIB is None:
        raise Failed(f"no torch found through {sys.executable}: {TORCH_VERSION}; set SCFM_GPU_PYTHON or SCFM_TORCH_LIB")
    if not (TORCH_LIB / "libtorch_cpu.so").exists():
        raise Failed(f"{TORCH_LIB} has no libtorch_cpu.so")


@part(60)
def versions(res, timeout):
    lg = part_log("versions")
    missing, libs = [], {}
    for b in (SCFM, WORKER):
        r = subprocess.run(["ldd", str(b)], capture_output=True, text=True, env=ENV, timeout=30)
        with open(lg, "a") as f:
            f.write(f"$ ldd {b}\n{r.stdout}{r.stderr}\n")
        for line in r.stdout.splitlines():
            m = re.match(r"\s*(\S+) => (.*?) \(", line)
            if "not found" in line:
                missing.append(f"{b.name}: {line.strip()}")
            elif m:
                libs.setdefault(b.name, {})[m.group(1)] = m.group(2)
        if r.stderr.strip():
            missing.append(f"{b.name}: {r.stderr.strip()}")
    res["libraries"] = libs
    vj = WORK / "versions.json"
    with open(vj, "w") as f:
        code, _ = wait_rusage(spawn([WORKER, "versions", "--json"], lg, ENV, stdout=f), timeout / 2)
    v = json_file(vj) or {}
    res["worker_versions"] = v
    with open(lg, "a") as f:
        f.write(json.dumps(v, indent=1) + "\n")
    code2, _ = run([SCFM, "--version"], lg, ENV, 30)
    problems = list(missing)
    if code != 0:
        problems.append(f"scfm-worker versions exited {code}")
    if code2 != 0:
        problems.append(f"scfm --version exited {code2}")
    lt = v.get("libtorch") or {}
    if lt.get("error"):
        problems.append(f"libtorch: {lt['error']}")
    if N_GPU and not (v.get("cuda") or {}).get("available"):
        problems.append(f"nvidia-smi lists {N_GPU} GPUs but libtorch sees no CUDA device")
    if N_GPU and not (v.get("nccl") or {}).get("loaded"):
        problems.append(f"NCCL did not load: {(v.get('nccl') or {}).get('error')}")
    if problems:
        raise Failed("; ".join(problems))


def bench_step(res, timeout, name, args):
    lg = part_log(name)
    out = WORK / f"{name}.json"
    cmd = [WORKER, "bench-step", "--json", out] + args
    with GpuMemory(N_GPU) as mem:
        code, rss = run(cmd, lg, ENV, timeout)
    res["host_peak_rss_mib"] = round(rss, 1)
    if N_GPU:
        res["gpu_mem_peak_mib"] = mem.peak()
    rep = json_file(out)
    if code is None:
        raise Failed(f"timed out after {timeout:.0f} s")
    if code != 0 or rep is None:
        raise Failed(f"scfm-worker bench-step exited {code}: {tail(lg)}")
    res["peak_tflops"] = rep["peak_tflops"]
    res["matmul_n"] = rep["matmul_n"]
    res["device"] = rep["device"]
    res["precision"] = rep["precision"]
    res["results"] = rep["results"]
    bad = [r["preset"] for r in rep["results"] if not r["agreement"]["ok"]]
    if bad:
        raise Failed(f"loss on {rep['device']} differs from CPU fp32 beyond tolerance for {bad}")


@part(90)
def cpu_step(res, timeout):
    threads = str(min(CPUS, 8))
    bench_step(res, timeout, "cpu-step", [
        "--device", "cpu", "--precision", "fp32", "--presets", "minimal", "--cells", "4",
        "--seq-len", "64", "--genes", "2000", "--steps", "5", "--warmup", "1",
        "--agree-cells", "2", "--matmul-n", "512", "--threads", threads,
    ])


@part(60)
def nccl_check(res, timeout):
    need_gpu()
    lg = part_log("nccl-check")
    out = WORK / "nccl-check.json"
    code, rss = run([WORKER, "nccl-check", "--mb", "256", "--iters", "20", "--json", out], lg, ENV, timeout)
    res["host_peak_rss_mib"] = round(rss, 1)
    r = json_file(out)
    if r:
        res.update(r)
    if code != 0 or not r:
        raise Failed(f"scfm-worker nccl-check exited {code}: {tail(lg)}")


@part(120)
def cuda_step_default(res, timeout):
    need_gpu()
    bench_step(res, timeout, "cuda-step-default", [
        "--device", "cuda", "--precision", "bf16", "--presets", "default", "--cells", "32",
        "--steps", "20", "--warmup", "3", "--agree-cells", "2", "--threads", str(min(CPUS, 16)),
    ])


def tail(p, n=8):
    try:
        return " | ".join(Path(p).read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


def two_worker_mode():
    """(collective, device, preset, batch, CUDA_VISIBLE_DEVICES per worker)."""
    if N_GPU >= 2:
        return "nccl", "cuda", "default", 32, ["0", "1"]
    if N_GPU == 1:
        return "ring", "cuda", "default", 32, ["0", "0"]
    return "ring", "cpu", "minimal", 8, [None, None]


def manifest(name, steps, min_workers):
    collective, device, preset, batch, _ = two_worker_mode()
    threads = 1 if device == "cpu" else max(1, min(CPUS // 2, 8))
    d = WORK / name
    d.mkdir()
    m = d / "job.yaml"
    m.write_text(
        f"run_id: gpu-run-{name}\n"
        f"data: {{path: {DATA}, validation_fraction: 0.05, loader_threads: {1 if device == 'cpu' else 2}}}\n"
        f"model: {{preset: {preset}}}\n"
        f"training: {{batch_size: {batch}, max_steps: {steps}, threads: {threads}, log_every: 5, eval_every: 100000}}\n"
        f"cluster: {{min_workers: {min_workers}, max_workers: 2, device: {device}, collective: {collective},\n"
        f"          coordinator: '127.0.0.1:0', heartbeat_ms: 200, worker_timeout_s: 10,\n"
        f"          collective_timeout_s: 60, join_timeout_s: 60}}\n"
        f"checkpoint: {{url: {d / 'ckpt'}, every_steps: 100000}}\n"
    )
    return d, m


class Job:
    """`scfm launch` plus two `scfm-worker join` processes, each GPU-pinned as the mode says."""

    def __init__(self, name, steps, min_workers, res):
        self.name = name
        self.dir, m = manifest(name, steps, min_workers)
        mode = two_worker_mode()
        res.update({"collective": mode[0], "device": mode[1], "preset": mode[2],
                    "batch_per_worker": mode[3], "steps": steps})
        self.lines = queue.Queue()
        self.seen = []
        self.coord_log = part_log(f"{name}-coordinator")
        self.coord = spawn([SCFM, "launch", m], self.coord_log, ENV, stdout=subprocess.PIPE)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.workers = []
        self.wlogs = []
        try:
            line = self.wait_line("coordinator listening on", 60)
        except Failed:
            self.kill_all()
            raise
        addr = line.strip().rsplit(" ", 1)[-1]
        for i, cvd in enumerate(mode[4]):
            env = dict(ENV)
            if cvd is not None:
                env["CUDA_VISIBLE_DEVICES"] = cvd
            lg = part_log(f"{name}-w{i}")
            self.wlogs.append(lg)
            self.workers.append(spawn([WORKER, "join", "--coordinator", f"http://{addr}"], lg, env))

    def _read(self):
        with open(self.coord_log, "a") as f:
            for raw in self.coord.stdout:
                line = raw.decode(errors="replace")
                f.write(line)
                f.flush()
                self.lines.put(line)

    def wait_line(self, needle, timeout):
        """The coordinator's next output line containing `needle`, within `timeout` s and
        while a worker (if any were started) still runs."""
        end = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=min(0.5, max(0.01, end - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > end:
                    raise Failed(f"no `{needle}` from the coordinator within {timeout:.0f} s: {tail(self.coord_log)}")
                if self.workers and all(exited(w) for w in self.workers):
                    raise Failed(f"every worker exited before the coordinator logged `{needle}`: "
                                 f"{tail(self.wlogs[0], 4)}")
                continue
            self.seen.append(line)
            if needle in line:
                return line

    def finish(self, timeout):
        """Waits for the coordinator (at most `timeout` s, and 15 s once every worker has
        exited: it would wait for workers to join) and the workers; returns the
        coordinator's exit code (None when it had to be killed), the workers' exit codes
        and their peak RSS (MiB)."""
        end = time.monotonic() + timeout
        done = {}
        all_gone = None
        code = None
        while True:
            for i, w in enumerate(self.workers):
                if i in done:
                    continue
                if w.returncode is not None:
                    done[i] = (w.returncode, 0.0)
                    continue
                pid, st, ru = os.wait4(w.pid, os.WNOHANG)
                if pid:
                    w.returncode = os.waitstatus_to_exitcode(st)
                    done[i] = (w.returncode, ru.ru_maxrss / 1024.0)
            pid, st, _ = os.wait4(self.coord.pid, os.WNOHANG)
            if pid:
                self.coord.returncode = code = os.waitstatus_to_exitcode(st)
                break
            now = time.monotonic()
            if len(done) == len(self.workers):
                all_gone = all_gone or now
            if now > end or (all_gone and now - all_gone > 15):
                kill_group(self.coord)
                os.wait4(self.coord.pid, 0)
                self.coord.returncode = -9
                log(f"{self.name}: coordinator killed ("
                    + ("every worker had exited" if all_gone else "past its time") + ")")
                break
            time.sleep(0.1)
        self.reader.join(timeout=5)
        for i, w in enumerate(self.workers):
            if i not in done:
                done[i] = wait_rusage(w, 30)
        codes = [done[i][0] for i in range(len(self.workers))]
        rss = [round(done[i][1], 1) for i in range(len(self.workers))]
        return code, codes, rss

    def kill_all(self):
        for p in [self.coord] + self.workers:
            if p.returncode is None:
                kill_group(p)

    def metrics(self):
        # The run's metrics log is a series of parts; `scfm metrics` prints it whole.
        if not (self.dir / "ckpt").exists():
            return []
        r = subprocess.run([str(SCFM), "metrics", str(self.dir / "ckpt")],
                           capture_output=True, text=True, timeout=60)
        out = []
        for line in r.stdout.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def worker_text(self, i):
        return Path(self.wlogs[i]).read_text(errors="replace")


def params_of(text):
    m = re.search(r"scfm model: (\d+) parameters", text)
    return int(m.group(1)) if m else None


def backend_lines(text):
    return sorted({m.group(0).strip() for m in re.finditer(r"collective backend[^\n]*", text)})[:4]


@part(150)
def two_workers(res, timeout):
    steps = 40 if N_GPU else 16
    with GpuMemory(N_GPU) as mem:
        job = Job("two-workers", steps, 2, res)
        try:
            code, codes, rss = job.finish(timeout - 10)
        finally:
            job.kill_all()
    if N_GPU:
        res["gpu_mem_peak_mib"] = mem.peak()
    res["exit_codes"] = {"coordinator": code, "workers": codes}
    res["host_peak_rss_mib"] = rss
    texts = [job.worker_text(i) for i in range(2)]
    fps = [m.group(1) if (m := re.search(r"parameter fingerprint ([0-9a-f]+)", t)) else None for t in texts]
    res["fingerprints"] = fps
    res["backend"] = backend_lines(texts[0])
    n = params_of(texts[0])
    res["params"] = n
    steps_ = [m for m in job.metrics() if m.get("event") == "step" and m.get("world_size") == 2]
    ar = sorted(m["allreduce_s"] for m in steps_ if m.get("step", 0) > 3 and m.get("allreduce_s"))
    if ar and n:
        med = statistics.median(ar)
        res["allreduce_median_ms"] = round(med * 1e3, 3)
        res["grad_mb"] = round(4 * n / 1e6, 2)
        res["busbw_gbs"] = round(2 * (2 - 1) / 2 * 4 * n / med / 1e9, 3)
    st = [m.get("step_s") for m in steps_ if m.get("step", 0) > 3 and m.get("step_s")]
    if st:
        res["step_median_ms"] = round(statistics.median(st) * 1e3, 2)
    problems = []
    if code != 0 or any(c != 0 for c in codes):
        problems.append(f"exit codes: coordinator {code}, workers {codes}: {tail(job.coord_log)}")
    if None in fps or fps[0] != fps[1]:
        problems.append(f"parameter fingerprints differ or are missing: {fps}")
    if res["collective"] == "nccl" and not any("nccl" in b.lower() for b in res["backend"]):
        problems.append(f"NCCL was asked for but the backend lines say: {res['backend']}")
    if problems:
        raise Failed("; ".join(problems))


@part(180)
def worker_kill(res, timeout):
    steps = 120 if N_GPU else 60
    start = time.monotonic()
    job = Job("worker-kill", steps, 1, res)
    try:
        job.wait_line("train step=10 ", timeout / 2)
        victim = job.workers[1]
        os.killpg(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        victim.wait()
        res["killed"] = "w1 (SIGKILL) after the coordinator logged step 10"
        job.wait_line("first step of the new generation", 90)
        res["noticed_and_resumed_s"] = round(time.monotonic() - killed_at, 2)
        code, codes, rss = job.finish(max(10, timeout - (time.monotonic() - start) - 5))
    finally:
        job.kill_all()
    res["exit_codes"] = {"coordinator": code, "survivor": codes[0]}
    res["host_peak_rss_mib"] = rss[0]
    lines = job.metrics()
    rec = [m for m in lines if m.get("event") == "recovered"]
    res["recovered"] = rec
    gens = [(m.get("generation"), m.get("world_size")) for m in lines if m.get("event") == "generation"]
    res["generations"] = gens
    last = max((m.get("step", 0) for m in lines if m.get("event") == "step"), default=0)
    res["last_step"] = last
    res["backend_after"] = backend_lines(job.worker_text(0))
    problems = []
    if code != 0 or codes[0] != 0:
        problems.append(f"exit codes: coordinator {code}, survivor {codes[0]}: {tail(job.coord_log)}")
    if last != steps:
        problems.append(f"the run ended at step {last}, not {steps}")
    if not rec:
        problems.append("no `recovered` event in the metrics log")
    if problems:
        raise Failed("; ".join(problems))


@part(150)
def cuda_step_large(res, timeout):
    need_gpu()
    bench_step(res, timeout, "cuda-step-large", [
        "--device", "cuda", "--precision", "bf16", "--presets", "large", "--cells", "16",
        "--steps", "10", "--warmup", "2", "--agree-cells", "1", "--threads", str(min(CPUS, 16)),
    ])


# ----------------------------------------------------------------------------- main

def main():
    SUMMARY["bundle"] = json_file(BUNDLE / "bundle.json")
    wanted = os.environ.get("SCFM_GPU_RUN_PARTS")
    wanted = set(wanted.split(",")) if wanted else None
    log(f"bundle {BUNDLE}, out {OUT}, work {WORK}, {N_GPU} GPU(s), torch lib {TORCH_LIB}, budget {BUDGET_S:.0f} s")
    for name, timeout, f in PARTS:
        res = {}
        t = time.monotonic()
        if wanted is not None and name not in wanted:
            res.update(status="skipped", reason="not in SCFM_GPU_RUN_PARTS")
        elif left() < 15:
            res.update(status="skipped", reason=f"out of time ({BUDGET_S:.0f} s budget spent)")
        else:
            limit = min(timeout, left() - 5)
            log(f"{name}: start (limit {limit:.0f} s)")
            try:
                f(res, limit)
                res["status"] = "ok"
            except Skip as e:
                res.update(status="skipped", reason=str(e))
            except Failed as e:
                res.update(status="failed", reason=str(e))
            except Exception as e:  # a bug or an unexpected output: the part fails, the rest runs
                res.update(status="failed", reason=f"{type(e).__name__}: {e}")
        res["seconds"] = round(time.monotonic() - t, 2)
        SUMMARY["parts"][name] = res
        log(f"{name}: {res['status']}" + (f" ({res['reason']})" if res.get("reason") else "") + f" in {res['seconds']} s")
        (OUT / "summary.json").write_text(json.dumps(SUMMARY, indent=1, default=str))
    SUMMARY["seconds"] = round(time.monotonic() - T0, 1)
    (OUT / "summary.json").write_text(json.dumps(SUMMARY, indent=1, default=str))
    with open(OUT / "parts.log", "w") as f:
        for p in _part_logs:
            f.write(f"\n===== {p.name} =====\n")
            try:
                f.write(Path(p).read_text(errors="replace")[-2_000_000:])
            except OSError as e:
                f.write(f"(unreadable: {e})\n")
    failed = [n for n, r in SUMMARY["parts"].items() if r["status"] == "failed"]
    log(f"done in {SUMMARY['seconds']} s: " + ", ".join(f"{n} {r['status']}" for n, r in SUMMARY["parts"].items()))
    shutil.rmtree(WORK, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
