/* C side of libsparsedge.so (compiled by `sparsedge build-capi` through cffi's set_source).
 *
 * The public functions of sparsedge.h are plain C here. The ones that need the runtime call
 * `extern "Python"` functions (implemented in sparsedge/runtime/capi/embedded.py); the first
 * such call starts the embedded interpreter. Before that, se_start_python() initialises
 * Python ourselves as if it were the interpreter that built the library (program_name =
 * its path, so a virtual environment's pyvenv.cfg and site-packages are found), unless the
 * process already runs Python. cffi then finds Python initialised and only runs the init
 * code. If that fails, cffi returns zeroed results: the wrappers detect it through
 * se_ready (set by the init code) and return SPARSEDGE_ERR_INIT instead of a false OK.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sparsedge.h"

#ifndef SPARSEDGE_BUILD_PYTHON
#define SPARSEDGE_BUILD_PYTHON ""
#endif
#ifndef SPARSEDGE_VERSION_STRING
#define SPARSEDGE_VERSION_STRING "unknown"
#endif

#define SE_API __attribute__((visibility("default")))
#define SE_ERRLEN 2048

/* implemented in Python (embedded.py); static per cffi's rules for extern "Python" */
static int sparsedge__py_open(const char *, const sparsedge_options *, sparsedge_session **);
static int sparsedge__py_close(sparsedge_session *);
static int sparsedge__py_count(const sparsedge_session *, int, size_t *);
static int sparsedge__py_info(const sparsedge_session *, int, size_t, const char **, int32_t *,
                              int32_t *, const int64_t **);
static int sparsedge__py_index(const sparsedge_session *, int, const char *, size_t *);
static int sparsedge__py_shapes(sparsedge_session *, const sparsedge_tensor *, size_t,
                                sparsedge_tensor *, size_t, int);

static __thread char se_error[SE_ERRLEN];
static volatile int se_ready = 0;          /* set by the init code once the runtime imported */
static pthread_once_t se_once = PTHREAD_ONCE_INIT;
static char se_start_error[512];           /* why starting Python failed, if it did */
static char se_python_used[1024];

/* ---- helpers callable from Python (declared in the cdef) ---- */
static void sparsedge__set_error(const char *msg)
{
    if (msg == NULL) { se_error[0] = 0; return; }
    strncpy(se_error, msg, SE_ERRLEN - 1);
    se_error[SE_ERRLEN - 1] = 0;
}
static void sparsedge__mark_ready(void) { se_ready = 1; }
static const char *sparsedge__python_used(void) { return se_python_used; }

static int se_fail(int status, const char *msg)
{
    sparsedge__set_error(msg);
    return status;
}

static void se_start_python_once(void)
{
    PyStatus st;
    PyConfig config;
    const char *py;
    if (Py_IsInitialized())
        return;                                /* a host interpreter: use it */
    py = getenv("SPARSEDGE_PYTHON");
    if (py == NULL || py[0] == 0)
        py = SPARSEDGE_BUILD_PYTHON;
    strncpy(se_python_used, py, sizeof(se_python_used) - 1);
    PyConfig_InitPythonConfig(&config);
    config.install_signal_handlers = 0;        /* the host program owns signals */
    config.parse_argv = 0;
    if (py[0] != 0) {
        st = PyConfig_SetBytesString(&config, &config.program_name, py);
        if (PyStatus_Exception(st)) goto fail;
    }
    st = Py_InitializeFromConfig(&config);
    if (PyStatus_Exception(st)) goto fail;
    PyConfig_Clear(&config);
    PyEval_SaveThread();                       /* release the GIL: cffi takes it per call */
    return;
fail:
    snprintf(se_start_error, sizeof(se_start_error),
             "cannot start the embedded Python (%s): %s",
             py[0] ? py : "default", st.err_msg ? st.err_msg : "unknown error");
    PyConfig_Clear(&config);
}

/* Start Python if needed. Returns 0 when calls into Python may be attempted. */
static int se_start_python(void)
{
    pthread_once(&se_once, se_start_python_once);
    if (se_start_error[0]) {
        se_fail(SPARSEDGE_ERR_INIT, se_start_error);
        return -1;
    }
    return 0;
}

/* After a call into Python: if the init code failed, cffi returned a zero. */
static int se_check(int rc)
{
    if (!se_ready) {
        char msg[1400];
        snprintf(msg, sizeof(msg),
                 "the embedded Python could not import the sparsedge runtime (details on stderr); "
                 "python used: %s. Set SPARSEDGE_PYTHON to the python of an environment where "
                 "sparsedge is installed, or PYTHONPATH",
                 se_python_used[0] ? se_python_used : "the host process's");
        return se_fail(SPARSEDGE_ERR_INIT, msg);
    }
    return rc;
}

#define SE_CALL(expr) do { if (se_start_python() != 0) return SPARSEDGE_ERR_INIT; \
                           return se_check(expr); } while (0)

/* ---- public API ---- */
SE_API const char *sparsedge_version(void) { return SPARSEDGE_VERSION_STRING; }
SE_API int sparsedge_capi_version(void) { return SPARSEDGE_CAPI_VERSION; }
SE_API const char *sparsedge_last_error(void) { return se_error; }

SE_API const char *sparsedge_status_name(int status)
{
    switch (status) {
    case SPARSEDGE_OK: return "SPARSEDGE_OK";
    case SPARSEDGE_ERR_ARGUMENT: return "SPARSEDGE_ERR_ARGUMENT";
    case SPARSEDGE_ERR_MODEL_FILE: return "SPARSEDGE_ERR_MODEL_FILE";
    case SPARSEDGE_ERR_INPUT: return "SPARSEDGE_ERR_INPUT";
    case SPARSEDGE_ERR_BUFFER_SIZE: return "SPARSEDGE_ERR_BUFFER_SIZE";
    case SPARSEDGE_ERR_UNSUPPORTED: return "SPARSEDGE_ERR_UNSUPPORTED";
    case SPARSEDGE_ERR_INTERNAL: return "SPARSEDGE_ERR_INTERNAL";
    case SPARSEDGE_ERR_INIT: return "SPARSEDGE_ERR_INIT";
    default: return "SPARSEDGE_UNKNOWN_STATUS";
    }
}

SE_API size_t sparsedge_dtype_size(int dtype)
{
    switch (dtype) {
    case SPARSEDGE_FLOAT32: case SPARSEDGE_INT32: return 4;
    case SPARSEDGE_INT64: return 8;
    case SPARSEDGE_INT8: case SPARSEDGE_UINT8: case SPARSEDGE_BOOL: return 1;
    default: return 0;
    }
}

SE_API void sparsedge_options_init(sparsedge_options *options)
{
    if (options == NULL) return;
    memset(options, 0, sizeof(*options));
    options->struct_size = (int32_t)sizeof(*options);
}

SE_API int sparsedge_open(const char *path, const sparsedge_options *options, sparsedge_session **session)
{
    if (session != NULL) *session = NULL;
    if (session == NULL) return se_fail(SPARSEDGE_ERR_ARGUMENT, "sparsedge_open: session (the out pointer) is NULL");
    if (path == NULL) return se_fail(SPARSEDGE_ERR_ARGUMENT, "sparsedge_open: path is NULL");
    SE_CALL(sparsedge__py_open(path, options, session));
}

SE_API int sparsedge_close(sparsedge_session *session)
{
    if (session == NULL) return SPARSEDGE_OK;
    SE_CALL(sparsedge__py_close(session));
}

SE_API int sparsedge_num_inputs(const sparsedge_session *session, size_t *count)
{
    SE_CALL(sparsedge__py_count(session, 0, count));
}

SE_API int sparsedge_num_outputs(const sparsedge_session *session, size_t *count)
{
    SE_CALL(sparsedge__py_count(session, 1, count));
}

SE_API int sparsedge_input_info(const sparsedge_session *session, size_t index, const char **name,
                                int32_t *dtype, int32_t *rank, const int64_t **shape)
{
    SE_CALL(sparsedge__py_info(session, 0, index, name, dtype, rank, shape));
}

SE_API int sparsedge_output_info(const sparsedge_session *session, size_t index, const char **name,
                                 int32_t *dtype, int32_t *rank, const int64_t **shape)
{
    SE_CALL(sparsedge__py_info(session, 1, index, name, dtype, rank, shape));
}

SE_API int sparsedge_input_index(const sparsedge_session *session, const char *name, size_t *index)
{
    SE_CALL(sparsedge__py_index(session, 0, name, index));
}

SE_API int sparsedge_output_index(const sparsedge_session *session, const char *name, size_t *index)
{
    SE_CALL(sparsedge__py_index(session, 1, name, index));
}

SE_API int sparsedge_output_shapes(sparsedge_session *session,
                                   const sparsedge_tensor *inputs, size_t num_inputs,
                                   sparsedge_tensor *outputs, size_t num_outputs)
{
    SE_CALL(sparsedge__py_shapes(session, inputs, num_inputs, outputs, num_outputs, 0));
}

SE_API int sparsedge_run(sparsedge_session *session,
                         const sparsedge_tensor *inputs, size_t num_inputs,
                         sparsedge_tensor *outputs, size_t num_outputs)
{
    SE_CALL(sparsedge__py_shapes(session, inputs, num_inputs, outputs, num_outputs, 1));
}
