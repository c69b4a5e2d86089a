/*
 * embedded_python.c - a C program that loads CPython itself (dlopen) and runs one piece of code:
 * the interpreter starts after the shim, so the shim's arena allocator is installed from the
 * first pending call, not at load, and the arenas CPython took before that were never charged.
 *
 * usage: embedded_python LIBPYTHON CODE   (PYTHONHOME set to the interpreter's prefix)
 * exit: 0 when the code ran without an exception, 1 when it raised, 2 on a setup error.
 */
#include <dlfcn.h>
#include <stdio.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: embedded_python LIBPYTHON CODE\n");
        return 2;
    }
    void *python = dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL);
    if (python == NULL) {
        fprintf(stderr, "dlopen %s: %s\n", argv[1], dlerror());
        return 2;
    }
    void (*initialize)(void) = (void (*)(void))dlsym(python, "Py_Initialize");
    int (*run)(const char *) = (int (*)(const char *))dlsym(python, "PyRun_SimpleString");
    int (*finalize)(void) = (int (*)(void))dlsym(python, "Py_FinalizeEx");
    if (initialize == NULL || run == NULL || finalize == NULL) {
        fprintf(stderr, "expected Py_Initialize, PyRun_SimpleString and Py_FinalizeEx in %s\n", argv[1]);
        return 2;
    }
    initialize();
    int failed = run(argv[2]) != 0;
    if (finalize() < 0)
        failed = 1;
    return failed;
}
