package main

// The Go side of one embedded decision, part by part, for
// benchmarks/decision_latency.py's breakdown:
//
//	go test -run '^$' -bench . -benchmem ./    (from native/)
//
// The policy is the default library (../policies, tests excluded), the input the
// `allowed` example widened to 20 parameters, the query the decision's path: the
// same decision as the Python benchmark. Each part is what rg_eval does (see
// main.go), timed alone; BenchmarkEvalBody is all of rg_eval's body but the cgo
// entry and the C copy of the reply. Test files cannot use cgo, so the parts are
// rebuilt here from the same calls main.go makes.

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/storage/inmem"
	"github.com/open-policy-agent/opa/v1/topdown"
)

const decisionQuery = `data["prefect"]["governance"]["decision"]`

// benchPolicy compiles ../policies as rg_open does.
func benchPolicy(b *testing.B) *policy {
	b.Helper()
	root := filepath.Join("..", "policies")
	var files []string
	err := filepath.Walk(root, func(path string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() && strings.HasSuffix(path, ".rego") &&
			!strings.HasSuffix(path, "_test.rego") {
			files = append(files, path)
		}
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	sort.Strings(files)
	modules := map[string]*ast.Module{}
	for _, path := range files {
		source, err := os.ReadFile(path)
		if err != nil {
			b.Fatal(err)
		}
		name, _ := filepath.Rel(root, path)
		parsed, err := ast.ParseModuleWithOpts(name, string(source), ast.ParserOptions{
			RegoVersion: ast.RegoV1, ProcessAnnotation: true,
		})
		if err != nil {
			b.Fatal(err)
		}
		modules[name] = parsed
	}
	compiler := ast.NewCompiler().WithEnablePrintStatements(false)
	if compiler.Compile(modules); compiler.Failed() {
		b.Fatal(compiler.Errors)
	}
	store := inmem.NewFromObjectWithOpts(map[string]any{},
		inmem.OptRoundTripOnWrite(false), inmem.OptReturnASTValuesOnRead(true))
	return &policy{compiler: compiler, store: store}
}

// benchInput is the benchmark's input: the `allowed` example, 20 parameters.
func benchInput(b *testing.B) []byte {
	b.Helper()
	out, err := benchInputBytes()
	if err != nil {
		b.Fatal(err)
	}
	return out
}

func benchInputBytes() ([]byte, error) {
	raw, err := os.ReadFile(filepath.Join("..", "policies", "examples", "allowed", "input.json"))
	if err != nil {
		return nil, err
	}
	var document map[string]any
	if err := json.Unmarshal(raw, &document); err != nil {
		return nil, err
	}
	params := document["envelope"].(map[string]any)["parameters"].(map[string]any)
	for i := 0; len(params) < 20; i++ {
		params["option_"+strconv.Itoa(i)] = "value-" + strconv.Itoa(i)
	}
	return json.Marshal(document)
}

func prepared(b *testing.B) (*rego.PreparedEvalQuery, ast.Value, []byte) {
	b.Helper()
	q, value, input, _ := preparedWith(b)
	return q, value, input
}

func preparedWith(b *testing.B) (*rego.PreparedEvalQuery, ast.Value, []byte, *policy) {
	b.Helper()
	p := benchPolicy(b)
	q, err := p.prepare(decisionQuery)
	if err != nil {
		b.Fatal(err)
	}
	input := benchInput(b)
	value, err := readInput(input)
	if err != nil {
		b.Fatal(err)
	}
	return q, value, input, p
}

func eval(b *testing.B, q *rego.PreparedEvalQuery, value ast.Value, options ...rego.EvalOption) rego.ResultSet {
	rs, err := q.Eval(context.Background(), append(options, rego.EvalParsedInput(value))...)
	if err != nil || len(rs) != 1 {
		b.Fatalf("eval: %v %v", rs, err)
	}
	return rs
}

// Input conversion: the input's JSON to an ast.Value (main.go's readInput).
func BenchmarkInputToAST(b *testing.B) {
	input := benchInput(b)
	b.SetBytes(int64(len(input)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := readInput(input); err != nil {
			b.Fatal(err)
		}
	}
}

// Evaluation of the prepared query, the input already an ast.Value. It includes
// OPA's own conversion of the result from ast.Value to Go values (rego.Eval
// returns Go values), which BenchmarkResultASTToGo times alone.
func BenchmarkEvalPrepared(b *testing.B) {
	q, value, _ := prepared(b)
	b.ReportAllocs()
	for b.Loop() {
		eval(b, q, value)
	}
}

// The deadline rg_eval sets up for each evaluation (a cancel, a timer).
func BenchmarkDeadline(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		cancel := topdown.NewCancel()
		timer := time.AfterFunc(5*time.Second, cancel.Cancel)
		timer.Stop()
	}
}

// Result conversion, Go values to JSON (rg_eval's json.Marshal of the result set).
func BenchmarkResultToJSON(b *testing.B) {
	q, value, _ := prepared(b)
	rs := eval(b, q, value)
	b.ReportAllocs()
	var size int
	for b.Loop() {
		data, err := marshalResults(rs)
		if err != nil {
			b.Fatal(err)
		}
		size = len(data)
	}
	b.SetBytes(int64(size))
}

// The part of evaluation that turns the result's ast.Value into Go values (ast.JSON).
func BenchmarkResultASTToGo(b *testing.B) {
	q, value, _ := prepared(b)
	rs := eval(b, q, value)
	term, err := ast.InterfaceToValue(rs[0].Expressions[0].Value)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ast.JSON(term); err != nil {
			b.Fatal(err)
		}
	}
}

// All of rg_eval's body: prepared-query lookup, input, deadline, eval, JSON result.
func BenchmarkEvalBody(b *testing.B) {
	p := benchPolicy(b)
	input := benchInput(b)
	if _, err := p.prepare(decisionQuery); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, failed := p.evaluate(decisionQuery, input, 5*time.Second); failed != nil {
			b.Fatal(failed.Message)
		}
	}
}

// The fixed cost of one evaluation: a prepared trivial query, no input.
func BenchmarkEvalTrivial(b *testing.B) {
	p := benchPolicy(b)
	q, err := p.prepare("true")
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := q.Eval(context.Background()); err != nil {
			b.Fatal(err)
		}
	}
}

// Candidate: the decision's evaluation in one long-lived read transaction of the
// store (the store is never written after rg_open), instead of one per Eval.
func BenchmarkEvalSharedTxn(b *testing.B) {
	q, value, _, p := preparedWith(b)
	txn, err := p.store.NewTransaction(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	defer p.store.Abort(context.Background(), txn)
	b.ReportAllocs()
	for b.Loop() {
		eval(b, q, value, rego.EvalTransaction(txn))
	}
}

// rg_eval's body with each part timed in the same iteration (so that their
// shares hold under a noisy machine): the figures are ns per decision per part.
func BenchmarkDecisionParts(b *testing.B) {
	p := benchPolicy(b)
	input := benchInput(b)
	if _, err := p.prepare(decisionQuery); err != nil {
		b.Fatal(err)
	}
	var prep, in, deadline, ev, out time.Duration
	b.ReportAllocs()
	for b.Loop() {
		t0 := time.Now()
		q, err := p.prepare(decisionQuery)
		if err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		value, err := readInput(input)
		if err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		cancel := topdown.NewCancel()
		timer := time.AfterFunc(5*time.Second, cancel.Cancel)
		t3 := time.Now()
		rs := eval(b, q, value, rego.EvalExternalCancel(cancel))
		t4 := time.Now()
		timer.Stop()
		if _, err := marshalResults(rs); err != nil {
			b.Fatal(err)
		}
		t5 := time.Now()
		prep += t1.Sub(t0)
		in += t2.Sub(t1)
		deadline += t3.Sub(t2) // the timer's Stop is counted in result
		ev += t4.Sub(t3)
		out += t5.Sub(t4)
	}
	n := float64(b.N)
	b.ReportMetric(float64(prep.Nanoseconds())/n, "prepare-ns/op")
	b.ReportMetric(float64(in.Nanoseconds())/n, "input-ns/op")
	b.ReportMetric(float64(deadline.Nanoseconds())/n, "deadline-ns/op")
	b.ReportMetric(float64(ev.Nanoseconds())/n, "eval-ns/op")
	b.ReportMetric(float64(out.Nanoseconds())/n, "result-ns/op")
}
