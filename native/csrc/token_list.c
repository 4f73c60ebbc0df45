/* A list (or tuple) of Python ints as uint32 token ids, in one pass.
 *
 * array.array("I", tokens) spends ~6 ns an item on generic conversion; a
 * prompt of 32k tokens is then a fifth of a lookup. Here an item costs one
 * exact-type check and one PyLong read. Called through ctypes.PyDLL, so the
 * GIL is held and the sequence cannot change under us.
 */
#include <Python.h>
#include <stdint.h>

/* Converts the n items of seq (a list or tuple) into out; returns -1 when all
 * were plain ints in [0, 2**32), else the index of the first that was not (the
 * caller's slower path then says what is wrong with it). */
long long kvstore_token_list(PyObject *seq, uint32_t *out, long long n) {
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (long long i = 0; i < n; i++) {
        PyObject *item = items[i];
        if (!PyLong_CheckExact(item)) return i;
        unsigned long v = PyLong_AsUnsignedLong(item);
        if (v == (unsigned long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return i;
        }
        if (v > 0xFFFFFFFFUL) return i;
        out[i] = (uint32_t)v;
    }
    return -1;
}
