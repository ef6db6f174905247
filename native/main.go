// Package main is the embedded policy engine: OPA's own Go SDK, built as a C
// shared library (go build -buildmode=c-shared) and called from Python through
// ctypes (prefect_governance/engines/native.py).
//
// A handle holds compiled modules and their data; each query is prepared once
// per handle and evaluated with strict builtin errors and a deadline. Every
// exported function recovers from a panic and reports it as an error, so a Go
// panic in an evaluation is a refusal, never a crash of the worker.
package main

/*
#include <stdlib.h>
#include <string.h>
*/
import "C"

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/storage"
	"github.com/open-policy-agent/opa/v1/storage/inmem"
	"github.com/open-policy-agent/opa/v1/topdown"
	"github.com/open-policy-agent/opa/v1/util"
	"github.com/open-policy-agent/opa/v1/version"
)

// spec is what rg_open is given: the modules (name, source) and the data document.
type spec struct {
	Modules [][2]string    `json:"modules"`
	Data    map[string]any `json:"data"`
}

// policy is one compiled revision: its compiler, store and prepared queries.
type policy struct {
	compiler *ast.Compiler
	store    storage.Store
	prepared sync.Map // query text -> *rego.PreparedEvalQuery
	mu       sync.Mutex
}

// failure is an error as rg_* report it: OPA's code and message.
type failure struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// result is one query result: its expressions' values and its bindings.
type result struct {
	Expressions []any          `json:"expressions"`
	Bindings    map[string]any `json:"bindings"`
}

// withheld are the builtins an in-process policy may not call: they would act
// with the worker's network identity, environment and files (http.send takes
// client certificates from files and environment variables). A policy that needs
// them runs in the OPA sidecar, in a process of its own.
var withheld = map[string]bool{"http.send": true, "net.lookup_ip_addr": true}

// capabilities are OPA's own, less the withheld builtins: a module calling one
// does not compile, and the error names it.
var capabilities = func() *ast.Capabilities {
	caps := ast.CapabilitiesForThisVersion()
	kept := caps.Builtins[:0]
	for _, builtin := range caps.Builtins {
		if !withheld[builtin.Name] {
			kept = append(kept, builtin)
		}
	}
	caps.Builtins = kept
	return caps
}()

var (
	policies sync.Map     // handle -> *policy
	handles  atomic.Int64 // the last handle given out
	open     atomic.Int64 // how many handles are open
)

// reply hands bytes to the caller in C memory it frees with rg_free.
func reply(data []byte, out **C.char, outlen *C.longlong) {
	buf := C.malloc(C.size_t(len(data) + 1))
	if len(data) > 0 {
		C.memcpy(buf, unsafe.Pointer(&data[0]), C.size_t(len(data)))
	}
	*out = (*C.char)(buf)
	*outlen = C.longlong(len(data))
}

// fail replies with an error and returns the status for it (1).
func fail(code, message string, out **C.char, outlen *C.longlong) C.int {
	data, _ := json.Marshal(failure{Code: code, Message: message})
	reply(data, out, outlen)
	return 1
}

// failureOf is err with OPA's code where it has one.
func failureOf(err error) *failure {
	code := "rego_error"
	switch e := err.(type) {
	case *topdown.Error:
		code = e.Code
	case ast.Errors:
		if len(e) > 0 {
			code = e[0].Code
		}
	case *ast.Error:
		code = e.Code
	}
	return &failure{Code: code, Message: err.Error()}
}

// failWith replies with err, with OPA's code where it has one.
func failWith(err error, out **C.char, outlen *C.longlong) C.int {
	f := failureOf(err)
	return fail(f.Code, f.Message, out, outlen)
}

// recovered turns a panic into an error reply; deferred by every export.
func recovered(status *C.int, out **C.char, outlen *C.longlong) {
	if r := recover(); r != nil {
		*status = fail("go_panic", fmt.Sprintf("the policy engine panicked: %v", r), out, outlen)
	}
}

//export rg_open
func rg_open(specJSON *C.char, n C.longlong, handle *C.longlong, out **C.char, outlen *C.longlong) (status C.int) {
	defer recovered(&status, out, outlen)
	var s spec
	if err := util.UnmarshalJSON(C.GoBytes(unsafe.Pointer(specJSON), C.int(n)), &s); err != nil {
		return fail("rego_parse_error", "the policy spec is not JSON: "+err.Error(), out, outlen)
	}
	modules := make(map[string]*ast.Module, len(s.Modules))
	for _, m := range s.Modules {
		parsed, err := ast.ParseModuleWithOpts(m[0], m[1], ast.ParserOptions{
			RegoVersion: ast.RegoV1, ProcessAnnotation: true,
		})
		if err != nil {
			return failWith(err, out, outlen)
		}
		modules[m[0]] = parsed
	}
	compiler := ast.NewCompiler().WithEnablePrintStatements(false).WithCapabilities(capabilities)
	if compiler.Compile(modules); compiler.Failed() {
		return failWith(compiler.Errors, out, outlen)
	}
	if s.Data == nil {
		s.Data = map[string]any{}
	}
	store := inmem.NewFromObjectWithOpts(s.Data,
		inmem.OptRoundTripOnWrite(false), inmem.OptReturnASTValuesOnRead(true))
	h := handles.Add(1)
	policies.Store(h, &policy{compiler: compiler, store: store})
	open.Add(1)
	*handle = C.longlong(h)
	return 0
}

// prepare returns the prepared query for text, preparing it on first use.
func (p *policy) prepare(text string) (*rego.PreparedEvalQuery, error) {
	if q, ok := p.prepared.Load(text); ok {
		return q.(*rego.PreparedEvalQuery), nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if q, ok := p.prepared.Load(text); ok {
		return q.(*rego.PreparedEvalQuery), nil
	}
	q, err := rego.New(
		rego.Query(text),
		rego.Compiler(p.compiler),
		rego.Store(p.store),
		rego.StoreReadAST(true),
		rego.StrictBuiltinErrors(true),
		rego.SetRegoVersion(ast.RegoV1),
		rego.Capabilities(capabilities),
	).PrepareForEval(context.Background())
	if err != nil {
		return nil, err
	}
	p.prepared.Store(text, &q)
	return &q, nil
}

//export rg_eval
func rg_eval(h C.longlong, query *C.char, qlen C.longlong, input *C.char, ilen C.longlong,
	timeoutNs C.longlong, out **C.char, outlen *C.longlong) (status C.int) {
	defer recovered(&status, out, outlen)
	found, ok := policies.Load(int64(h))
	if !ok {
		return fail("closed", "the policy handle is closed", out, outlen)
	}
	var document []byte
	if ilen >= 0 {
		document = unsafe.Slice((*byte)(unsafe.Pointer(input)), int(ilen))
	}
	data, failed := found.(*policy).evaluate(C.GoStringN(query, C.int(qlen)), document,
		time.Duration(timeoutNs))
	if failed != nil {
		return fail(failed.Code, failed.Message, out, outlen)
	}
	reply(data, out, outlen)
	return 0
}

// evaluate is rg_eval's work: the result set of query for input (nil: no input)
// as JSON, or why there is none. The whole of it (the query's preparation, the
// input's reading, the evaluation, the result's writing) runs in a goroutine the
// caller waits for no longer than timeout; then OPA's cancellation stops the
// evaluation, and what cannot be stopped (reading a large input) finishes
// unobserved.
func (p *policy) evaluate(query string, input []byte, timeout time.Duration) ([]byte, *failure) {
	type outcome struct {
		data   []byte
		failed *failure
	}
	cancel := topdown.NewCancel()
	done := make(chan outcome, 1)
	go func() {
		defer func() {
			if r := recover(); r != nil {
				done <- outcome{failed: &failure{Code: "go_panic", Message: fmt.Sprintf("the policy engine panicked: %v", r)}}
			}
		}()
		data, failed := p.run(query, input, cancel)
		done <- outcome{data, failed}
	}()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case o := <-done:
		return o.data, o.failed
	case <-timer.C:
		cancel.Cancel()
		return nil, &failure{Code: "eval_cancel_error", Message: fmt.Sprintf("the decision did not finish within %s", timeout)}
	}
}

// run prepares (once), reads the input, evaluates and writes the result.
func (p *policy) run(query string, input []byte, cancel topdown.Cancel) ([]byte, *failure) {
	q, err := p.prepare(query)
	if err != nil {
		return nil, failureOf(err)
	}
	options := []rego.EvalOption{rego.EvalExternalCancel(cancel)}
	if input != nil {
		value, err := readInput(input)
		if err != nil {
			return nil, &failure{Code: "invalid_input", Message: err.Error()}
		}
		options = append(options, rego.EvalParsedInput(value))
	}
	rs, err := q.Eval(context.Background(), options...)
	if err != nil {
		return nil, failureOf(err)
	}
	data, err := marshalResults(rs)
	if err != nil {
		return nil, &failure{Code: "result_error", Message: "the result cannot be written as JSON: " + err.Error()}
	}
	return data, nil
}

// readInput reads an input as OPA's server does: numbers kept exact, nothing
// after the document.
func readInput(data []byte) (ast.Value, error) {
	var document any
	if err := util.UnmarshalJSON(data, &document); err != nil {
		return nil, fmt.Errorf("the input is not JSON: %w", err)
	}
	value, err := ast.InterfaceToValue(document)
	if err != nil {
		return nil, fmt.Errorf("the input cannot be read: %w", err)
	}
	return value, nil
}

// marshalResults writes a result set as rg_eval answers it.
func marshalResults(rs rego.ResultSet) ([]byte, error) {
	results := make([]result, len(rs))
	for i, r := range rs {
		values := make([]any, len(r.Expressions))
		for j, e := range r.Expressions {
			values[j] = e.Value
		}
		results[i] = result{Expressions: values, Bindings: r.Bindings}
	}
	return json.Marshal(results)
}

//export rg_close
func rg_close(h C.longlong) {
	if _, found := policies.LoadAndDelete(int64(h)); found {
		open.Add(-1)
	}
}

//export rg_open_handles
func rg_open_handles() C.longlong {
	return C.longlong(open.Load())
}

// rg_panic panics inside the same guard as every other export: the check that a
// Go panic comes back as an error, not a crash.
//
//export rg_panic
func rg_panic(out **C.char, outlen *C.longlong) (status C.int) {
	defer recovered(&status, out, outlen)
	var missing map[string]int
	missing["x"] = 1 // a nil map: a real runtime panic
	return 0
}

//export rg_free
func rg_free(p *C.char) {
	C.free(unsafe.Pointer(p))
}

//export rg_gc_percent
func rg_gc_percent(percent C.int) C.int {
	return C.int(debug.SetGCPercent(int(percent)))
}

//export rg_version
func rg_version(out **C.char, outlen *C.longlong) {
	reply([]byte(version.Version), out, outlen)
}

func main() {}
