package main

import (
	"strings"
	"testing"
)

func TestSummarise(t *testing.T) {
	in := `# round 1: load average 0.50 0.40 0.30
goos: linux
pkg: github.com/ism-backend/ism-backend/ismvirtio
BenchmarkMove64K-2   	  1000	      1300 ns/op	50000.00 MB/s	         0.85 x_memmove	       0 B/op	       0 allocs/op
BenchmarkMove64K-2   	  1000	      1100 ns/op	60000.00 MB/s	         0.95 x_memmove	       0 B/op	       0 allocs/op
BenchmarkMove64K-2   	  1000	      1200 ns/op	55000.00 MB/s	         0.90 x_memmove	       0 B/op	       0 allocs/op
PASS
pkg: github.com/ism-backend/ism-backend/ism
BenchmarkMove64BVsMemmove-2   	  1000	      120.5 ns/op
`
	var out strings.Builder
	if err := summarise(strings.NewReader(in), &out); err != nil {
		t.Fatal(err)
	}
	got := out.String()
	for _, want := range []string{
		"# round 1: load average 0.50 0.40 0.30\n",
		"ismvirtio.Move64K  (3 runs: median, min .. max)\n",
		"  ns/op                  1200   1100 .. 1300  ±8%\n",
		"  x_memmove             0.900   0.850 .. 0.950  ±6%\n",
		"  allocs/op                 0   0 .. 0\n",
		"ism.Move64BVsMemmove  (1 runs: median, min .. max)\n",
		"  ns/op                 120.5   120.5 .. 120.5\n",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
}
