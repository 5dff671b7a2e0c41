/* sparsedge.h: the C API of the sparsedge runtime (libsparsedge.so).
 *
 * Build the library and this header with:   sparsedge build-capi OUT_DIR
 * Compile and link a program with:
 *     cc -I OUT_DIR app.c -L OUT_DIR -lsparsedge -Wl,-rpath,OUT_DIR -o app
 *
 * The library embeds a Python interpreter (cffi embedding mode) that runs the sparsedge
 * runtime (numpy + numba). At the first call that needs it, the library starts the
 * interpreter as if it were the Python that built it (its path is stored in the library,
 * so a virtual environment's packages are found without any setting). Override with the
 * environment variable SPARSEDGE_PYTHON=/path/to/venv/bin/python (same Python version).
 * PYTHONPATH and PYTHONHOME are honoured as by python itself. If the host process already
 * runs a Python interpreter, that one is used and sparsedge must be importable in it.
 *
 * Conventions
 *   - Every function that can fail returns a sparsedge_status: SPARSEDGE_OK (0) on success,
 *     a positive code otherwise. sparsedge_last_error() then gives a one-line message
 *     (thread-local: each thread sees the message of its own last failed call).
 *   - No call crashes or lets a Python exception escape on bad input: NULL pointers,
 *     unknown names, wrong dtypes, shapes or buffer sizes, missing or corrupt files and
 *     closed sessions all return an error code.
 *   - Arrays are dense, C order (row-major), native (little-endian) byte order.
 *   - A session may be used from several threads at once (sparsedge_run is thread-safe;
 *     each call has its own working memory). Do not close it while other threads use it.
 *   - Strings and shape arrays returned by the info functions belong to the session and
 *     stay valid until sparsedge_close.
 */
#ifndef SPARSEDGE_H
#define SPARSEDGE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SPARSEDGE_CAPI_VERSION 1

/* BEGIN CDEF (the block below is also fed to cffi: plain declarations only) */

/* Return codes. */
typedef enum sparsedge_status {
    SPARSEDGE_OK = 0,
    SPARSEDGE_ERR_ARGUMENT = 1,     /* NULL pointer, bad index or count, unknown or repeated name, closed session */
    SPARSEDGE_ERR_MODEL_FILE = 2,   /* model file missing, unreadable, corrupt, or of an unsupported version */
    SPARSEDGE_ERR_INPUT = 3,        /* a tensor's dtype or shape does not fit the model (inputs or outputs) */
    SPARSEDGE_ERR_BUFFER_SIZE = 4,  /* a buffer's nbytes does not match (input) or is too small (output) */
    SPARSEDGE_ERR_UNSUPPORTED = 5,  /* the model uses an op or feature this runtime does not support */
    SPARSEDGE_ERR_INTERNAL = 6,     /* a bug in sparsedge: the message carries the Python exception */
    SPARSEDGE_ERR_INIT = 7          /* the embedded Python or the sparsedge package could not be started */
} sparsedge_status;

/* Element types. Values are stable (part of the ABI). */
typedef enum sparsedge_dtype {
    SPARSEDGE_DTYPE_UNKNOWN = 0,
    SPARSEDGE_FLOAT32 = 1,          /* float, 4 bytes */
    SPARSEDGE_INT64 = 2,            /* int64_t, 8 bytes */
    SPARSEDGE_INT32 = 3,            /* int32_t, 4 bytes */
    SPARSEDGE_INT8 = 4,             /* int8_t, 1 byte */
    SPARSEDGE_UINT8 = 5,            /* uint8_t, 1 byte */
    SPARSEDGE_BOOL = 6              /* 1 byte per element, 0 or 1 */
} sparsedge_dtype;

/* Opaque session handle (a loaded model). */
typedef struct sparsedge_session sparsedge_session;

/* Options for sparsedge_open. Initialise with sparsedge_options_init, then set fields. */
typedef struct sparsedge_options {
    int32_t struct_size;            /* sizeof(sparsedge_options); set by sparsedge_options_init */
    int32_t threads;                /* kernel threads per run call; 0 = runtime default */
    int32_t tune;                   /* nonzero: time candidate kernels at load (sparsedge tune) */
    int32_t reserved;               /* must be 0 */
} sparsedge_options;

/* A tensor passed to sparsedge_output_shapes / sparsedge_run. */
typedef struct sparsedge_tensor {
    const char *name;   /* model input/output name, or NULL for the i-th one in model order */
    int32_t dtype;      /* a sparsedge_dtype; must equal the model's (output_shapes writes it) */
    int32_t rank;       /* inputs: number of dims in shape. outputs: capacity of shape on entry,
                           the output's rank on return */
    int64_t *shape;     /* inputs: read. outputs: the output's shape is written here */
    void *data;         /* inputs: read. outputs: written (ignored by output_shapes) */
    size_t nbytes;      /* inputs: must equal elements * element size.
                           outputs: run: capacity, must be >= the bytes needed;
                           output_shapes: the bytes needed are written here */
} sparsedge_tensor;

/* The library version (e.g. "0.1.0") and the C API version (SPARSEDGE_CAPI_VERSION). */
const char *sparsedge_version(void);
int sparsedge_capi_version(void);

/* The message of this thread's last failed call ("" if none). Valid until this thread's
   next sparsedge call. */
const char *sparsedge_last_error(void);

/* A short name for a status code, e.g. "SPARSEDGE_ERR_INPUT". */
const char *sparsedge_status_name(int status);

/* Element size in bytes of a dtype (0 for an unknown one). */
size_t sparsedge_dtype_size(int dtype);

void sparsedge_options_init(sparsedge_options *options);

/* Load a model file. options may be NULL (defaults). On success *session is set; on
   failure it is set to NULL (when session is not NULL). */
int sparsedge_open(const char *path, const sparsedge_options *options, sparsedge_session **session);

/* Release a session. NULL is accepted (no-op). Closing twice returns SPARSEDGE_ERR_ARGUMENT. */
int sparsedge_close(sparsedge_session *session);

int sparsedge_num_inputs(const sparsedge_session *session, size_t *count);
int sparsedge_num_outputs(const sparsedge_session *session, size_t *count);

/* Name, dtype, rank and declared shape of input/output `index`. Symbolic dims
   (e.g. batch) are -1. Any of name, dtype, rank, shape may be NULL. */
int sparsedge_input_info(const sparsedge_session *session, size_t index, const char **name,
                         int32_t *dtype, int32_t *rank, const int64_t **shape);
int sparsedge_output_info(const sparsedge_session *session, size_t index, const char **name,
                          int32_t *dtype, int32_t *rank, const int64_t **shape);

/* Index of the input/output called `name`. */
int sparsedge_input_index(const sparsedge_session *session, const char *name, size_t *index);
int sparsedge_output_index(const sparsedge_session *session, const char *name, size_t *index);

/* Shapes of the outputs for the given input shapes, before running, so that callers can
   size their buffers. inputs: every model input once (name or position; rank and shape
   read, dtype checked when nonzero, data ignored). outputs: the outputs wanted (name or
   position); for each, dtype, rank, shape and nbytes are written (shape needs room for
   rank dims: pass its capacity in rank). */
int sparsedge_output_shapes(sparsedge_session *session,
                            const sparsedge_tensor *inputs, size_t num_inputs,
                            sparsedge_tensor *outputs, size_t num_outputs);

/* Run the model. inputs: every model input once. outputs: the outputs wanted, each with a
   caller-owned buffer (data, nbytes >= needed) and room for its shape (capacity in rank);
   their shape and rank are written. Nothing is written to any output buffer when the call
   fails a check before running. Thread-safe. */
int sparsedge_run(sparsedge_session *session,
                  const sparsedge_tensor *inputs, size_t num_inputs,
                  sparsedge_tensor *outputs, size_t num_outputs);

/* END CDEF */

#ifdef __cplusplus
}
#endif

#endif /* SPARSEDGE_H */
