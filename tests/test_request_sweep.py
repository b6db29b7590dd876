"""The request sweep preloaded into tritonserver (fish_s2/serving/request_sweep.c), against a stand-in for
Triton's core library: a program plays the frontend (its calls are the executable's), a second library
plays a backend, and the stand-in hands out freed addresses again as malloc does. Without a C compiler
the sweep is not built and these tests skip."""

import os
import subprocess
from pathlib import Path

import pytest

from fish_s2.serving import sweep
from fish_s2.serving.server import TritonServer

pytestmark = pytest.mark.skipif(sweep.compiler() is None, reason="no C compiler")

CORE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
typedef void (*ReleaseFn)(void*, const uint32_t, void*);
typedef struct Req { ReleaseFn fn; void* userp; char model[16]; } Req;
static void* freed[64];
static int n_freed = 0, deletes = 0, cancels = 0, stops = 0, errors = 0;
static int err_obj;
void* TRITONSERVER_InferenceRequestNew(void** req, void* server, const char* model, int64_t version) {
  (void)server; (void)version;
  Req* r = n_freed ? freed[--n_freed] : calloc(1, sizeof(Req));   /* the last freed address first */
  memset(r, 0, sizeof(*r));
  strncpy(r->model, model, 15);
  *req = r;
  return NULL;
}
void* TRITONSERVER_InferenceRequestDelete(void* req) { deletes++; freed[n_freed++] = req; return NULL; }
void* TRITONSERVER_InferenceRequestCancel(void* req) { (void)req; cancels++; return NULL; }
void* TRITONSERVER_InferenceRequestSetReleaseCallback(void* req, ReleaseFn fn, void* userp) {
  ((Req*)req)->fn = fn; ((Req*)req)->userp = userp; return NULL;
}
void* TRITONSERVER_ServerInferAsync(void* server, void* req, void* trace) {
  (void)server; (void)trace;
  return strcmp(((Req*)req)->model, "refused") == 0 ? &err_obj : NULL;
}
void* TRITONSERVER_ServerStop(void* server) { (void)server; stops++; return NULL; }
void* TRITONSERVER_ErrorNew(int code, const char* msg) { (void)code; (void)msg; errors++; return &err_obj; }
void core_release(void* req) { Req* r = req; r->fn(req, 1u, r->userp); }   /* RELEASE_ALL */
int core_deletes(void) { return deletes; }
int core_cancels(void) { return cancels; }
"""

BACKEND = r"""
#include <stdint.h>
void* TRITONSERVER_InferenceRequestNew(void**, void*, const char*, int64_t);
void* TRITONSERVER_InferenceRequestDelete(void*);
void* backend_new(void) { void* r; TRITONSERVER_InferenceRequestNew(&r, 0, "dual_ar", -1); return r; }
void backend_delete(void* r) { TRITONSERVER_InferenceRequestDelete(r); }
"""

FRONTEND = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
typedef void (*ReleaseFn)(void*, const uint32_t, void*);
void* TRITONSERVER_InferenceRequestNew(void**, void*, const char*, int64_t);
void* TRITONSERVER_InferenceRequestDelete(void*);
void* TRITONSERVER_InferenceRequestCancel(void*);
void* TRITONSERVER_InferenceRequestSetReleaseCallback(void*, ReleaseFn, void*);
void* TRITONSERVER_ServerInferAsync(void*, void*, void*);
void* TRITONSERVER_ServerStop(void*);
void core_release(void*);
int core_deletes(void);
int core_cancels(void);
void* backend_new(void);
void backend_delete(void*);

static int released = 0;
static void on_release(void* req, const uint32_t flags, void* userp) { (void)req; (void)flags; released += *(int*)userp; }
static int one = 1;

static void* issue(const char* model) {   /* what the gRPC handler does with one request */
  void* r;
  TRITONSERVER_InferenceRequestNew(&r, 0, model, -1);
  TRITONSERVER_InferenceRequestSetReleaseCallback(r, on_release, &one);
  TRITONSERVER_ServerInferAsync(0, r, 0);
  return r;
}

int main(void) {
  const char* preload = getenv("LD_PRELOAD");
  printf("preload_left=%s\n", preload ? preload : "");
  void* ended = issue("tts");       /* ended, still held by its state: (b) */
  core_release(ended);
  void* refused = issue("refused"); /* refused by the core, still held: (a) */
  void* done = issue("tts");        /* ended and deleted by its state: nothing to sweep */
  core_release(done);
  TRITONSERVER_InferenceRequestDelete(done);
  void* running = issue("tts");     /* still in the core */
  printf("released_before_stop=%d deletes_before_stop=%d\n", released, core_deletes());
  TRITONSERVER_ServerStop(0);
  usleep(1600 * 1000);
  printf("deletes_after_sweep=%d\n", core_deletes());
  TRITONSERVER_InferenceRequestDelete(ended);   /* the states' late calls touch nothing */
  TRITONSERVER_InferenceRequestCancel(refused);
  printf("deletes_after_late_calls=%d cancels=%d\n", core_deletes(), core_cancels());
  void* fresh;                      /* a new frontend request never gets a swept address */
  TRITONSERVER_InferenceRequestNew(&fresh, 0, "tts", -1);
  printf("fresh_is_swept=%d deletes_after_new=%d\n", fresh == ended || fresh == refused, core_deletes());
  void* bls = backend_new();        /* a backend's request is not followed, at any address */
  backend_delete(bls);
  printf("deletes_after_backend=%d\n", core_deletes());
  core_release(running);            /* ends during the stop: swept after the grace */
  usleep(1600 * 1000);
  printf("deletes_at_end=%d released=%d\n", core_deletes(), released);
  return 0;
}
"""


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    for name, src in (("core", CORE), ("backend", BACKEND), ("frontend", FRONTEND)):
        (d / f"{name}.c").write_text(src)
    cc = sweep.compiler()
    run = lambda *a: subprocess.run([cc, *a], cwd=d, check=True, capture_output=True)
    run("-shared", "-fPIC", "-o", "libcore.so", "core.c")
    run("-shared", "-fPIC", "-o", "libbackend.so", "backend.c", "-L.", "-lcore")
    run("-o", "frontend", "frontend.c", "-L.", "-lbackend", "-lcore", "-Wl,-rpath,$ORIGIN")
    library = sweep.build(d / "lib")
    assert library is not None and library.name.startswith(sweep.NAME)
    return d, library


def _run(d: Path, preload: str) -> dict[str, str]:
    out = subprocess.run([str(d / "frontend")], env={**os.environ, "LD_PRELOAD": preload}, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return dict(kv.split("=", 1) for line in out.splitlines() for kv in line.split())


def test_the_sweep_releases_what_the_frontend_keeps_and_nothing_else(programs):
    d, library = programs
    got = _run(d, str(library))
    assert got["preload_left"] == ""                     # the backend stubs do not inherit it
    assert got["released_before_stop"] == "2"            # release callbacks reach the frontend's own
    assert got["deletes_before_stop"] == "1"             # nothing swept while the server runs
    assert got["deletes_after_sweep"] == "3"             # the ended and the refused request, not the running one
    assert got["deletes_after_late_calls"] == "3" and got["cancels"] == "0"
    assert got["fresh_is_swept"] == "0" and got["deletes_after_new"] == "5"   # the two swept addresses, skipped
    assert got["deletes_after_backend"] == "6"           # a backend's delete at a swept address is done
    assert got["deletes_at_end"] == "7" and got["released"] == "3"


def test_the_sweep_leaves_other_preloads_to_the_children(programs):
    d, library = programs
    assert _run(d, f"{library}:libcore.so")["preload_left"] == "libcore.so"


def test_the_server_preloads_it_unless_turned_off(tmp_path, monkeypatch):
    server = TritonServer(tmp_path / "repo", tmp_path / "run", tritonserver=Path("/bin/true"), backend_dir=tmp_path)
    _, env = server.command()
    assert sweep.NAME in env["LD_PRELOAD"].split(":")[0] and Path(env["LD_PRELOAD"].split(":")[0]).is_file()
    monkeypatch.setenv(sweep.ENV, "0")
    off = TritonServer(tmp_path / "repo", tmp_path / "run", tritonserver=Path("/bin/true"), backend_dir=tmp_path)
    assert sweep.NAME not in off.command()[1].get("LD_PRELOAD", "")
