// newdelete.cpp - C++ allocation under the shim: operator new/delete and
// std::vector go through the shim's malloc and are counted, and a `new`
// over the budget throws std::bad_alloc that the program catches and
// survives.
//
// Built at -O0: C++14 lets a compiler drop a new/delete pair it can see,
// and these cases must really allocate.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>
#include <vector>

#include <malloc.h>

#include "../c/shimcheck.h"

static const size_t OVER_BUDGET_BYTES = 100 * MIB;

// Keeps the optimiser from proving a block unused.
static void *volatile sink;

static void new_and_delete_are_counted_by_the_shim()
{
    uint64_t before = host_live();
    int *a = new int[1000];
    sink = a;
    std::memset(a, 1, 1000 * sizeof(int));
    EXPECT_COUNTED("new int[1000]", a, before);
    delete[] a;
    EXPECT_LIVE_BACK("delete[] of new int[1000]", before);

    struct Node {
        Node *next;
        char payload[200];
    };
    Node *n = new Node();
    sink = n;
    EXPECT_COUNTED("new Node", n, before);
    delete n;
    EXPECT_LIVE_BACK("delete of new Node", before);
}

static void vector_growth_keeps_contents_and_is_counted()
{
    uint64_t before = host_live();
    {
        std::vector<uint32_t> v;
        for (uint32_t i = 0; i < 1000000; i++)
            v.push_back(i * 2654435761u);
        for (uint32_t i = 0; i < 1000000; i++)
            if (v[i] != i * 2654435761u) {
                EXPECT(false, "expected element %u to survive vector growth", i);
                break;
            }
        EXPECT_COUNTED("a grown std::vector", v.data(), before);
        EXPECT(host_live() >= before + v.capacity() * sizeof(uint32_t),
               "expected live to cover the vector's capacity %zu bytes", v.capacity() * sizeof(uint32_t));
    }
    EXPECT_LIVE_BACK("the vector went out of scope", before);
}

static void aligned_new_is_aligned_and_counted()
{
    uint64_t before = host_live();
    void *p = ::operator new(10000, std::align_val_t(4096));
    sink = p;
    EXPECT(reinterpret_cast<uintptr_t>(p) % 4096 == 0, "expected operator new(align 4096) aligned, got %p", p);
    EXPECT_COUNTED("aligned operator new", p, before);
    ::operator delete(p, std::align_val_t(4096));
    EXPECT_LIVE_BACK("aligned operator delete", before);
}

static void new_over_budget_throws_bad_alloc_and_program_goes_on()
{
    struct qvshim_pool_stats s = host_stats();
    REQUIRE(s.budget == 64 * MIB, "expected QVSHIM_BUDGET=64M (%zu bytes), got %llu", 64 * MIB,
            (unsigned long long)s.budget);
    bool caught = false;
    try {
        char *huge = new char[OVER_BUDGET_BYTES];
        sink = huge;
        EXPECT(false, "expected new char[100 MiB] under a 64M budget to throw, got %p", (void *)huge);
        delete[] huge;
    } catch (const std::bad_alloc &) {
        caught = true;
    }
    EXPECT(caught, "expected std::bad_alloc from new char[100 MiB] over the budget");

    // The program goes on: ordinary C++ allocation still works.
    uint64_t before = host_live();
    {
        std::vector<char> ok(8 * MIB, 'x');
        EXPECT(ok[8 * MIB - 1] == 'x', "expected an 8 MiB vector after the refusal");
        std::vector<std::vector<int>> many(1000, std::vector<int>(100, 7));
        EXPECT(many[999][99] == 7, "expected 1000 small vectors after the refusal");
    }
    EXPECT_LIVE_BACK("vectors made after the refusal went out of scope", before);
}

static void nothrow_new_over_budget_returns_nullptr()
{
    struct qvshim_pool_stats s = host_stats();
    REQUIRE(s.budget == 64 * MIB, "expected QVSHIM_BUDGET=64M, got %llu", (unsigned long long)s.budget);
    char *p = new (std::nothrow) char[OVER_BUDGET_BYTES];
    sink = p;
    EXPECT(p == nullptr, "expected new (std::nothrow) char[100 MiB] over budget to return nullptr, got %p",
           (void *)p);
    delete[] p;
}

static const struct check_case cases[] = {
    CASE(new_and_delete_are_counted_by_the_shim),
    CASE(vector_growth_keeps_contents_and_is_counted),
    CASE(aligned_new_is_aligned_and_counted),
    CASE(new_over_budget_throws_bad_alloc_and_program_goes_on),
    CASE(nothrow_new_over_budget_returns_nullptr),
};

int main(int argc, char **argv)
{
    return RUN_CASES(cases, argc, argv);
}
