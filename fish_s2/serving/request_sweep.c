/* Preloaded into tritonserver (LD_PRELOAD; built and preloaded by fish_s2/serving/sweep.py): on SIGTERM,
 * release the inference requests that Triton's gRPC stream handler keeps after their end, so that the
 * models they name can unload and the server exits within its exit timeout.
 *
 * Why. Triton's gRPC stream handler (server src/grpc/stream_infer_handler.cc, infer_handler.h; 2.51
 * measured, the same code in later releases as far as read) keeps each request of a stream
 * (TRITONSERVER_InferenceRequest, which holds a reference to its model) until the request's handler
 * state is released. When a client cancels a stream, the state of the stream's first request is
 * never released if
 *   (a) that request was refused before reaching any model (an input of the wrong type or shape, an
 *       unknown input, bad raw input contents): the state is not in the "in flight" set that the
 *       cancellation walks, and nothing else puts it back on the completion queue; or
 *   (b) the cancellation is processed while that request's final response is still being written:
 *       the state is marked "cancellation issued" and waits for a response callback that never comes,
 *       because the request has already ended.
 * The request, and with it its model, then stays referenced for the life of the process. On SIGTERM
 * the server finds 0 in-flight inferences but the model never unloads ("Found 1 live models" each
 * second), the exit timeout expires (exit code 1) and the model's python stub is left behind.
 *
 * What this does. It follows the requests that tritonserver's own frontends create (calls from the
 * executable, never a backend's): created, issued, then released by the server core (the release
 * callback with RELEASE_ALL) or refused by TRITONSERVER_ServerInferAsync. While the server runs it
 * only keeps that record. From TRITONSERVER_ServerStop on (SIGTERM), a thread deletes every request
 * the core has been done with for SWEEP_GRACE_MS (or that was never issued, UNISSUED_GRACE_MS after
 * it was made) and that the frontend still holds, until the process exits. The frontend's later
 * TRITONSERVER_InferenceRequestDelete or TRITONSERVER_InferenceRequestCancel of a swept request is
 * answered without touching it (a state holds its request as an opaque pointer and calls nothing
 * else on one the core has released), and the frontend is never handed a new request at the address
 * of a swept one.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct TRITONSERVER_Error TRITONSERVER_Error;
typedef struct TRITONSERVER_Server TRITONSERVER_Server;
typedef struct TRITONSERVER_InferenceRequest TRITONSERVER_InferenceRequest;
typedef struct TRITONSERVER_InferenceTrace TRITONSERVER_InferenceTrace;
typedef void (*ReleaseFn)(TRITONSERVER_InferenceRequest*, const uint32_t, void*);

typedef TRITONSERVER_Error* (*NewFn)(TRITONSERVER_InferenceRequest**, TRITONSERVER_Server*, const char*, const int64_t);
typedef TRITONSERVER_Error* (*RequestFn)(TRITONSERVER_InferenceRequest*);
typedef TRITONSERVER_Error* (*SetReleaseFn)(TRITONSERVER_InferenceRequest*, ReleaseFn, void*);
typedef TRITONSERVER_Error* (*InferAsyncFn)(TRITONSERVER_Server*, TRITONSERVER_InferenceRequest*,
                                            TRITONSERVER_InferenceTrace*);
typedef TRITONSERVER_Error* (*StopFn)(TRITONSERVER_Server*);
typedef TRITONSERVER_Error* (*ErrorNewFn)(int, const char*);
#define ERROR_UNAVAILABLE 4     /* TRITONSERVER_ERROR_UNAVAILABLE */

#define RELEASE_ALL 1u          /* TRITONSERVER_REQUEST_RELEASE_ALL */
#define SWEEP_GRACE_MS 1000     /* how long the core must have been done with a request before it is swept */
#define UNISSUED_GRACE_MS 5000  /* ... or how long ago it was created, when it was never issued */
#define SWEEP_PERIOD_MS 200
#define SELF_NAME "fish_s2_request_sweep"

enum { NEW = 0, ISSUED = 1, DONE = 2, SWEPT = 3 };

typedef struct Entry {
  TRITONSERVER_InferenceRequest* request;
  int state;
  int64_t since_ms;   /* NEW: created at; DONE: ended at */
  ReleaseFn release_fn;
  void* release_userp;
  struct Entry* next;
} Entry;

/* recursive: the core may call a release callback from inside a call made under it */
static pthread_mutex_t mu = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
#define BUCKETS 4096
static Entry* table[BUCKETS];   /* the frontends' requests by address; swept ones stay as tombstones */
static int stopping = 0;
static uintptr_t exe_lo = 0, exe_hi = 0;   /* the executable's mapped range: who is calling */

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int from_executable(void* caller) {
  return exe_hi != 0 && (uintptr_t)caller >= exe_lo && (uintptr_t)caller < exe_hi;
}

static Entry** bucket(TRITONSERVER_InferenceRequest* request) {
  uintptr_t h = (uintptr_t)request >> 4;
  return &table[(h ^ (h >> 12)) % BUCKETS];
}

static Entry* find(TRITONSERVER_InferenceRequest* request) {   /* mu held */
  for (Entry* e = *bucket(request); e != NULL; e = e->next)
    if (e->request == request) return e;
  return NULL;
}

static void unlink_entry(Entry* entry) {   /* mu held */
  for (Entry** p = bucket(entry->request); *p != NULL; p = &(*p)->next)
    if (*p == entry) { *p = entry->next; free(entry); return; }
}

static void* next_fn(const char* name) {
  void* fn = dlsym(RTLD_NEXT, name);
  if (fn == NULL) {
    fprintf(stderr, SELF_NAME ": %s not found: %s\n", name, dlerror());
    abort();
  }
  return fn;
}

static NewFn real_new;
static RequestFn real_delete, real_cancel;
static SetReleaseFn real_set_release;
static InferAsyncFn real_infer_async;
static StopFn real_stop;
static ErrorNewFn real_error_new;
static pthread_once_t resolved = PTHREAD_ONCE_INIT;

static void resolve(void) {
  real_new = (NewFn)next_fn("TRITONSERVER_InferenceRequestNew");
  real_delete = (RequestFn)next_fn("TRITONSERVER_InferenceRequestDelete");
  real_cancel = (RequestFn)next_fn("TRITONSERVER_InferenceRequestCancel");
  real_set_release = (SetReleaseFn)next_fn("TRITONSERVER_InferenceRequestSetReleaseCallback");
  real_infer_async = (InferAsyncFn)next_fn("TRITONSERVER_ServerInferAsync");
  real_stop = (StopFn)next_fn("TRITONSERVER_ServerStop");
  real_error_new = (ErrorNewFn)next_fn("TRITONSERVER_ErrorNew");
}
#define RESOLVE() pthread_once(&resolved, resolve)

static int range_of_executable(struct dl_phdr_info* info, size_t size, void* data) {
  (void)size; (void)data;
  for (int i = 0; i < info->dlpi_phnum; i++) {   /* the first object listed is the executable */
    if (info->dlpi_phdr[i].p_type != PT_LOAD) continue;
    uintptr_t lo = info->dlpi_addr + info->dlpi_phdr[i].p_vaddr, hi = lo + info->dlpi_phdr[i].p_memsz;
    if (exe_lo == 0 || lo < exe_lo) exe_lo = lo;
    if (hi > exe_hi) exe_hi = hi;
  }
  return 1;
}

__attribute__((constructor)) static void init(void) {
  dl_iterate_phdr(range_of_executable, NULL);
  /* not for the backend stubs and their children: drop this library from the LD_PRELOAD they inherit */
  const char* preload = getenv("LD_PRELOAD");
  if (preload != NULL && strstr(preload, SELF_NAME) != NULL) {
    char* kept = calloc(strlen(preload) + 1, 1);
    char* copy = strdup(preload);
    char* save = NULL;
    for (char* tok = strtok_r(copy, ": ", &save); tok != NULL; tok = strtok_r(NULL, ": ", &save)) {
      if (strstr(tok, SELF_NAME) != NULL) continue;
      if (kept[0] != '\0') strcat(kept, ":");
      strcat(kept, tok);
    }
    if (kept[0] == '\0') unsetenv("LD_PRELOAD"); else setenv("LD_PRELOAD", kept, 1);
    free(copy);
    free(kept);
  }
}

/* ------------------------------------------------------------------ following the requests */

/* Only the executable's own calls (its gRPC and HTTP frontends) are followed: a backend's requests
 * (python BLS) pass straight through, also when one lands at the address of a swept request. */
#define CALLER_IS_EXECUTABLE() from_executable(__builtin_return_address(0))

TRITONSERVER_Error* TRITONSERVER_InferenceRequestNew(
    TRITONSERVER_InferenceRequest** request, TRITONSERVER_Server* server, const char* model_name,
    const int64_t model_version) {
  RESOLVE();
  int mine = CALLER_IS_EXECUTABLE();
  TRITONSERVER_Error* err = real_new(request, server, model_name, model_version);
  if (err != NULL || !mine) return err;
  /* never hand the frontend the address of a swept request: its old holder may still delete or cancel it */
  TRITONSERVER_InferenceRequest** held = NULL;
  size_t n_held = 0;
  pthread_mutex_lock(&mu);
  while (1) {
    Entry* old = find(*request);
    if (old == NULL || old->state != SWEPT) break;
    TRITONSERVER_InferenceRequest** grown = realloc(held, (n_held + 1) * sizeof(*held));
    if (grown == NULL) break;
    held = grown;
    held[n_held++] = *request;
    err = real_new(request, server, model_name, model_version);
    if (err != NULL) { *request = NULL; break; }
  }
  if (err == NULL) {
    Entry* entry = calloc(1, sizeof(Entry));
    if (entry != NULL) {
      entry->request = *request;
      entry->since_ms = now_ms();
      entry->next = *bucket(entry->request);
      *bucket(entry->request) = entry;
    }
  }
  pthread_mutex_unlock(&mu);
  for (size_t i = 0; i < n_held; i++) real_delete(held[i]);   /* never followed: freed for good */
  free(held);
  return err;
}

static void release_trampoline(TRITONSERVER_InferenceRequest* request, const uint32_t flags, void* userp) {
  (void)userp;
  ReleaseFn fn = NULL;
  void* fn_userp = NULL;
  pthread_mutex_lock(&mu);
  Entry* entry = find(request);
  if (entry != NULL && entry->state != SWEPT) {
    fn = entry->release_fn;
    fn_userp = entry->release_userp;
    if ((flags & RELEASE_ALL) != 0 && entry->state == ISSUED) {
      entry->state = DONE;
      entry->since_ms = now_ms();
    }
  }
  pthread_mutex_unlock(&mu);
  if (fn != NULL) fn(request, flags, fn_userp);   /* may delete the request: called without mu */
}

TRITONSERVER_Error* TRITONSERVER_InferenceRequestSetReleaseCallback(
    TRITONSERVER_InferenceRequest* request, ReleaseFn release_fn, void* release_userp) {
  RESOLVE();
  Entry* entry = NULL;
  if (CALLER_IS_EXECUTABLE()) {
    pthread_mutex_lock(&mu);
    entry = find(request);
    if (entry != NULL && entry->state == NEW) {
      entry->release_fn = release_fn;
      entry->release_userp = release_userp;
    } else {
      entry = NULL;
    }
    pthread_mutex_unlock(&mu);
  }
  return entry != NULL ? real_set_release(request, release_trampoline, NULL)
                       : real_set_release(request, release_fn, release_userp);
}

TRITONSERVER_Error* TRITONSERVER_ServerInferAsync(
    TRITONSERVER_Server* server, TRITONSERVER_InferenceRequest* request, TRITONSERVER_InferenceTrace* trace) {
  RESOLVE();
  if (!CALLER_IS_EXECUTABLE()) return real_infer_async(server, request, trace);
  pthread_mutex_lock(&mu);
  Entry* entry = find(request);
  if (entry != NULL && entry->state == SWEPT) {   /* only after a stall of UNISSUED_GRACE_MS while stopping */
    pthread_mutex_unlock(&mu);
    return real_error_new(ERROR_UNAVAILABLE, "the server is stopping");
  }
  if (entry != NULL) entry->state = ISSUED;
  pthread_mutex_unlock(&mu);
  TRITONSERVER_Error* err = real_infer_async(server, request, trace);
  if (err != NULL && entry != NULL) {   /* refused: the caller keeps the request, the core never releases it */
    pthread_mutex_lock(&mu);
    if (entry->state == ISSUED) {   /* still the frontend's: it cannot have deleted it before this returned */
      entry->state = DONE;
      entry->since_ms = now_ms();
    }
    pthread_mutex_unlock(&mu);
  }
  return err;
}

TRITONSERVER_Error* TRITONSERVER_InferenceRequestDelete(TRITONSERVER_InferenceRequest* request) {
  RESOLVE();
  if (!CALLER_IS_EXECUTABLE()) return real_delete(request);
  pthread_mutex_lock(&mu);
  Entry* entry = find(request);
  int swept = entry != NULL && entry->state == SWEPT;
  if (entry != NULL && !swept) unlink_entry(entry);
  pthread_mutex_unlock(&mu);
  return swept ? NULL : real_delete(request);   /* a swept request is gone already */
}

TRITONSERVER_Error* TRITONSERVER_InferenceRequestCancel(TRITONSERVER_InferenceRequest* request) {
  RESOLVE();
  if (!CALLER_IS_EXECUTABLE()) return real_cancel(request);
  pthread_mutex_lock(&mu);   /* held across the call, so that the sweep cannot delete it meanwhile */
  Entry* entry = find(request);
  TRITONSERVER_Error* err = (entry != NULL && entry->state == SWEPT) ? NULL : real_cancel(request);
  pthread_mutex_unlock(&mu);
  return err;
}

/* ------------------------------------------------------------------ the sweep */

static void* sweep(void* arg) {
  (void)arg;
  long total = 0;
  while (1) {
    TRITONSERVER_InferenceRequest* batch[256];
    int n = 0;
    int64_t now = now_ms();
    pthread_mutex_lock(&mu);
    for (int b = 0; b < BUCKETS && n < 256; b++) {
      for (Entry* e = table[b]; e != NULL && n < 256; e = e->next) {
        if ((e->state == DONE && now - e->since_ms >= SWEEP_GRACE_MS) ||
            (e->state == NEW && now - e->since_ms >= UNISSUED_GRACE_MS)) {
          e->state = SWEPT;
          batch[n++] = e->request;
        }
      }
    }
    pthread_mutex_unlock(&mu);
    for (int i = 0; i < n; i++) real_delete(batch[i]);   /* drops the request's reference to its model */
    if (n > 0) {
      total += n;
      fprintf(stderr, SELF_NAME ": released %d request(s) that tritonserver's frontend kept after their end "
                      "(%ld since the stop began); their models can unload\n", n, total);
      fflush(stderr);
    }
    usleep(SWEEP_PERIOD_MS * 1000);
  }
  return NULL;
}

TRITONSERVER_Error* TRITONSERVER_ServerStop(TRITONSERVER_Server* server) {
  RESOLVE();
  pthread_mutex_lock(&mu);
  int first = !stopping;
  stopping = 1;
  pthread_mutex_unlock(&mu);
  if (first) {
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&thread, &attr, sweep, NULL) != 0)
      fprintf(stderr, SELF_NAME ": could not start the sweep thread; models held by ended requests will not unload\n");
    pthread_attr_destroy(&attr);
  }
  return real_stop(server);
}
