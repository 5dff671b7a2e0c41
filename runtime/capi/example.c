/* example.c: load a sparsedge model from C, run it on raw input files, write raw outputs.
 *
 * Build (after `sparsedge build-capi OUT`):
 *     cc -O2 -I OUT example.c -L OUT -lsparsedge -Wl,-rpath,OUT -lpthread -o example
 * Run:
 *     ./example MODEL.sparsedge [-t THREADS] [-j NTHREADS -r RUNS] [-o OUT_PREFIX] NAME=D0,D1,...:FILE ...
 *
 * Each input is given as its name, its shape and a file holding the raw array (C order,
 * the model's dtype, e.g. numpy's arr.tofile). Every output is written to
 * OUT_PREFIX<name>.bin (default prefix "out_") and its shape printed.
 * With -j N the model is then also run from N threads at once, RUNS times each, and every
 * result is compared byte for byte with the first run.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sparsedge.h"

#define MAX_IO 64
#define MAX_RANK 16

static const char *dtype_name(int32_t d)
{
    static const char *names[] = {"unknown", "float32", "int64", "int32", "int8", "uint8", "bool"};
    return (d >= 0 && d <= 6) ? names[d] : "?";
}

static int check(int status, const char *what)
{
    if (status != SPARSEDGE_OK) {
        fprintf(stderr, "%s failed: %s: %s\n", what, sparsedge_status_name(status), sparsedge_last_error());
        exit(1);
    }
    return status;
}

static void *read_file(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    void *buf;
    long n;
    if (!f) { perror(path); exit(1); }
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = malloc(n > 0 ? (size_t)n : 1);
    if (n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n) { perror(path); exit(1); }
    fclose(f);
    *size = (size_t)n;
    return buf;
}

struct job {
    sparsedge_session *session;
    const sparsedge_tensor *inputs;
    size_t num_inputs;
    const sparsedge_tensor *expected;   /* outputs of the first run */
    size_t num_outputs;
    int runs;
    int mismatches;
    int failures;
};

static void *worker(void *arg)
{
    struct job *job = arg;
    sparsedge_tensor outs[MAX_IO];
    int64_t shapes[MAX_IO][MAX_RANK];
    size_t i;
    int r;
    for (i = 0; i < job->num_outputs; i++) {
        outs[i] = job->expected[i];          /* same name, dtype, size */
        outs[i].shape = shapes[i];
        outs[i].rank = MAX_RANK;
        outs[i].data = malloc(job->expected[i].nbytes ? job->expected[i].nbytes : 1);
    }
    for (r = 0; r < job->runs; r++) {
        if (sparsedge_run(job->session, job->inputs, job->num_inputs, outs, job->num_outputs) != SPARSEDGE_OK) {
            fprintf(stderr, "thread run failed: %s\n", sparsedge_last_error());
            job->failures++;
            continue;
        }
        for (i = 0; i < job->num_outputs; i++)
            if (memcmp(outs[i].data, job->expected[i].data, job->expected[i].nbytes) != 0)
                job->mismatches++;
    }
    for (i = 0; i < job->num_outputs; i++) free(outs[i].data);
    return NULL;
}

int main(int argc, char **argv)
{
    const char *model = NULL, *prefix = "out_";
    int threads = 0, jobs = 0, runs = 10;
    sparsedge_options opt;
    sparsedge_session *s = NULL;
    sparsedge_tensor in[MAX_IO], out[MAX_IO];
    int64_t in_shape[MAX_IO][MAX_RANK], out_shape[MAX_IO][MAX_RANK];
    size_t n_in = 0, n_out = 0, n_given = 0, i;
    int a, k;

    for (a = 1; a < argc; a++) {
        if (!strcmp(argv[a], "-t") && a + 1 < argc) threads = atoi(argv[++a]);
        else if (!strcmp(argv[a], "-j") && a + 1 < argc) jobs = atoi(argv[++a]);
        else if (!strcmp(argv[a], "-r") && a + 1 < argc) runs = atoi(argv[++a]);
        else if (!strcmp(argv[a], "-o") && a + 1 < argc) prefix = argv[++a];
        else if (!model) model = argv[a];
        else {   /* NAME=D0,D1,...:FILE */
            char *spec = argv[a], *eq = strchr(spec, '='), *colon = strrchr(spec, ':'), *p;
            if (!eq || !colon || colon < eq || n_given >= MAX_IO) {
                fprintf(stderr, "bad input spec %s (want NAME=D0,D1,...:FILE)\n", spec);
                return 2;
            }
            *eq = 0; *colon = 0;
            memset(&in[n_given], 0, sizeof(in[n_given]));
            in[n_given].name = spec;
            in[n_given].shape = in_shape[n_given];
            for (p = eq + 1, k = 0; *p && k < MAX_RANK; k++) {
                in_shape[n_given][k] = strtoll(p, &p, 10);
                if (*p == ',') p++;
            }
            in[n_given].rank = k;
            in[n_given].data = read_file(colon + 1, &in[n_given].nbytes);
            n_given++;
        }
    }
    if (!model) {
        fprintf(stderr, "usage: %s MODEL [-t THREADS] [-j NTHREADS -r RUNS] [-o PREFIX] NAME=D0,D1,...:FILE ...\n",
                argv[0]);
        return 2;
    }

    printf("sparsedge %s (C API %d)\n", sparsedge_version(), sparsedge_capi_version());
    sparsedge_options_init(&opt);
    opt.threads = threads;
    check(sparsedge_open(model, &opt, &s), "sparsedge_open");
    check(sparsedge_num_inputs(s, &n_in), "sparsedge_num_inputs");
    check(sparsedge_num_outputs(s, &n_out), "sparsedge_num_outputs");
    if (n_out > MAX_IO) { fprintf(stderr, "too many outputs\n"); return 1; }

    for (i = 0; i < n_in + n_out; i++) {
        const char *name; int32_t dtype, rank; const int64_t *shape;
        int is_in = i < n_in;
        size_t j = is_in ? i : i - n_in;
        check(is_in ? sparsedge_input_info(s, j, &name, &dtype, &rank, &shape)
                    : sparsedge_output_info(s, j, &name, &dtype, &rank, &shape), "info");
        printf("%s %zu: %s %s [", is_in ? "input" : "output", j, name, dtype_name(dtype));
        for (k = 0; k < rank; k++) printf(k ? ", %lld" : "%lld", (long long)shape[k]);
        printf("]\n");
        if (is_in) {   /* inputs: the dtype comes from the model */
            size_t g;
            for (g = 0; g < n_given; g++) if (!strcmp(in[g].name, name)) in[g].dtype = dtype;
        }
    }

    /* ask for the output shapes first, then allocate exactly what is needed */
    for (i = 0; i < n_out; i++) {
        memset(&out[i], 0, sizeof(out[i]));
        out[i].shape = out_shape[i];
        out[i].rank = MAX_RANK;          /* capacity of out_shape[i] */
    }
    check(sparsedge_output_shapes(s, in, n_given, out, n_out), "sparsedge_output_shapes");
    for (i = 0; i < n_out; i++) {
        out[i].data = malloc(out[i].nbytes ? out[i].nbytes : 1);
        out[i].rank = MAX_RANK;
    }
    check(sparsedge_run(s, in, n_given, out, n_out), "sparsedge_run");

    for (i = 0; i < n_out; i++) {
        const char *name; char path[4096]; FILE *f;
        check(sparsedge_output_info(s, i, &name, NULL, NULL, NULL), "sparsedge_output_info");
        printf("result %s %s [", name, dtype_name(out[i].dtype));
        for (k = 0; k < out[i].rank; k++) printf(k ? ", %lld" : "%lld", (long long)out[i].shape[k]);
        printf("] %zu bytes", out[i].nbytes);
        if (out[i].dtype == SPARSEDGE_FLOAT32 && out[i].nbytes >= 4)
            printf(" first %g", (double)((float *)out[i].data)[0]);
        printf("\n");
        snprintf(path, sizeof(path), "%s%s.bin", prefix, name);
        f = fopen(path, "wb");
        if (!f || fwrite(out[i].data, 1, out[i].nbytes, f) != out[i].nbytes) { perror(path); return 1; }
        fclose(f);
        out[i].name = name;            /* for the threaded check below */
    }

    if (jobs > 0) {
        pthread_t tid[256];
        struct job job[256];
        int bad = 0;
        if (jobs > 256) jobs = 256;
        for (k = 0; k < jobs; k++) {
            job[k] = (struct job){s, in, n_given, out, n_out, runs, 0, 0};
            pthread_create(&tid[k], NULL, worker, &job[k]);
        }
        for (k = 0; k < jobs; k++) {
            pthread_join(tid[k], NULL);
            bad += job[k].mismatches + job[k].failures;
        }
        printf("concurrent: %d threads x %d runs, %d bad\n", jobs, runs, bad);
        if (bad) return 1;
    }

    check(sparsedge_close(s), "sparsedge_close");
    for (i = 0; i < n_out; i++) free(out[i].data);
    for (i = 0; i < n_given; i++) free(in[i].data);
    return 0;
}
