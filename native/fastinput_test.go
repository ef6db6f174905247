package main

// A candidate for rg_eval's input conversion (not used by main.go): the input's
// JSON parsed straight into an ast.Value, without encoding/json's `any` tree in
// between (ast.ValueFromReader decodes to map[string]any, then converts). Numbers
// keep their literal text, as util.NewJSONDecoder's UseNumber does; strings with
// escapes are unquoted by encoding/json. Timed by BenchmarkInputDirect against
// BenchmarkInputToAST; TestInputDirectMatches checks it gives the same value.

import (
	"bytes"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/topdown"
)

type directParser struct {
	data []byte
	pos  int
}

var errSyntax = errors.New("invalid JSON")

func directValue(data []byte) (ast.Value, error) {
	p := directParser{data: data}
	term, err := p.value()
	if err != nil {
		return nil, err
	}
	p.space()
	if p.pos != len(p.data) {
		return nil, errSyntax
	}
	return term.Value, nil
}

func (p *directParser) space() {
	for p.pos < len(p.data) {
		switch p.data[p.pos] {
		case ' ', '\t', '\n', '\r':
			p.pos++
		default:
			return
		}
	}
}

func (p *directParser) value() (*ast.Term, error) {
	p.space()
	if p.pos >= len(p.data) {
		return nil, errSyntax
	}
	switch c := p.data[p.pos]; {
	case c == '{':
		return p.object()
	case c == '[':
		return p.array()
	case c == '"':
		s, err := p.str()
		if err != nil {
			return nil, err
		}
		return ast.StringTerm(s), nil
	case c == 't' && bytes.HasPrefix(p.data[p.pos:], []byte("true")):
		p.pos += 4
		return ast.BooleanTerm(true), nil
	case c == 'f' && bytes.HasPrefix(p.data[p.pos:], []byte("false")):
		p.pos += 5
		return ast.BooleanTerm(false), nil
	case c == 'n' && bytes.HasPrefix(p.data[p.pos:], []byte("null")):
		p.pos += 4
		return ast.NullTerm(), nil
	case c == '-' || (c >= '0' && c <= '9'):
		start := p.pos
		for p.pos < len(p.data) {
			switch d := p.data[p.pos]; {
			case d >= '0' && d <= '9', d == '-', d == '+', d == '.', d == 'e', d == 'E':
				p.pos++
				continue
			}
			break
		}
		text := string(p.data[start:p.pos])
		if !json.Valid(p.data[start:p.pos]) {
			return nil, errSyntax
		}
		return ast.NumberTerm(json.Number(text)), nil
	}
	return nil, errSyntax
}

func (p *directParser) str() (string, error) {
	start := p.pos // at the opening quote
	p.pos++
	escaped := false
	for p.pos < len(p.data) {
		switch c := p.data[p.pos]; {
		case c == '\\':
			escaped = true
			p.pos += 2
			continue
		case c == '"':
			p.pos++
			if !escaped {
				return string(p.data[start+1 : p.pos-1]), nil
			}
			var s string
			if err := json.Unmarshal(p.data[start:p.pos], &s); err != nil {
				return "", err
			}
			return s, nil
		case c < 0x20:
			return "", errSyntax
		}
		p.pos++
	}
	return "", errSyntax
}

func (p *directParser) object() (*ast.Term, error) {
	p.pos++ // {
	var items [][2]*ast.Term
	p.space()
	if p.pos < len(p.data) && p.data[p.pos] == '}' {
		p.pos++
		return ast.ObjectTerm(), nil
	}
	for {
		p.space()
		if p.pos >= len(p.data) || p.data[p.pos] != '"' {
			return nil, errSyntax
		}
		key, err := p.str()
		if err != nil {
			return nil, err
		}
		p.space()
		if p.pos >= len(p.data) || p.data[p.pos] != ':' {
			return nil, errSyntax
		}
		p.pos++
		value, err := p.value()
		if err != nil {
			return nil, err
		}
		items = append(items, ast.Item(ast.StringTerm(key), value))
		p.space()
		if p.pos >= len(p.data) {
			return nil, errSyntax
		}
		switch p.data[p.pos] {
		case ',':
			p.pos++
		case '}':
			p.pos++
			return ast.ObjectTerm(items...), nil // a repeated key: the last wins, as in encoding/json
		default:
			return nil, errSyntax
		}
	}
}

func (p *directParser) array() (*ast.Term, error) {
	p.pos++ // [
	var elems []*ast.Term
	p.space()
	if p.pos < len(p.data) && p.data[p.pos] == ']' {
		p.pos++
		return ast.ArrayTerm(), nil
	}
	for {
		value, err := p.value()
		if err != nil {
			return nil, err
		}
		elems = append(elems, value)
		p.space()
		if p.pos >= len(p.data) {
			return nil, errSyntax
		}
		switch p.data[p.pos] {
		case ',':
			p.pos++
		case ']':
			p.pos++
			return ast.ArrayTerm(elems...), nil
		default:
			return nil, errSyntax
		}
	}
}

func TestInputDirectMatches(t *testing.T) {
	inputs := []string{
		`{"a": 1, "b": [true, false, null, -1.5e3, "x\"y\u00e9"], "c": {}, "d": [], "e": {"f": "g"}}`,
		`"plain"`, `12345678901234567890123`, `[]`,
	}
	raw, err := benchInputBytes()
	if err != nil {
		t.Fatal(err)
	}
	inputs = append(inputs, string(raw))
	for _, input := range inputs {
		want, err := ast.ValueFromReader(bytes.NewReader([]byte(input)))
		if err != nil {
			t.Fatal(err)
		}
		got, err := directValue([]byte(input))
		if err != nil {
			t.Fatalf("%s: %v", input, err)
		}
		if ast.Compare(want, got) != 0 {
			t.Fatalf("%s:\n want %v\n got  %v", input, want, got)
		}
	}
	for _, bad := range []string{`{`, `{"a" 1}`, `[1,]`, `tru`, `"a`, `{"a":1} x`, `01x`} {
		if _, err := directValue([]byte(bad)); err == nil {
			t.Errorf("%q: accepted", bad)
		}
	}
}

// Candidate: the input parsed straight into an ast.Value (directValue).
func BenchmarkInputDirect(b *testing.B) {
	input := benchInput(b)
	b.SetBytes(int64(len(input)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := directValue(input); err != nil {
			b.Fatal(err)
		}
	}
}

// rg_eval's body as BenchmarkEvalBody, the input parsed by directValue.
func BenchmarkEvalBodyDirect(b *testing.B) {
	p := benchPolicy(b)
	input := benchInput(b)
	if _, err := p.prepare(decisionQuery); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		q, err := p.prepare(decisionQuery)
		if err != nil {
			b.Fatal(err)
		}
		value, err := directValue(input)
		if err != nil {
			b.Fatal(err)
		}
		cancel := topdown.NewCancel()
		timer := time.AfterFunc(5*time.Second, cancel.Cancel)
		rs := eval(b, q, value, rego.EvalExternalCancel(cancel))
		timer.Stop()
		if _, err := marshalResults(rs); err != nil {
			b.Fatal(err)
		}
	}
}

// The two input conversions alternated in one loop, and the whole body with
// each (so the comparison holds on a noisy machine): ns per decision of each.
func BenchmarkInputAB(b *testing.B) {
	p := benchPolicy(b)
	input := benchInput(b)
	q, err := p.prepare(decisionQuery)
	if err != nil {
		b.Fatal(err)
	}
	var viaAny, direct, bodyAny, bodyDirect time.Duration
	for b.Loop() {
		t0 := time.Now()
		v1, err := readInput(input)
		if err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		eval(b, q, v1)
		t2 := time.Now()
		v2, err := directValue(input)
		if err != nil {
			b.Fatal(err)
		}
		t3 := time.Now()
		eval(b, q, v2)
		t4 := time.Now()
		viaAny += t1.Sub(t0)
		direct += t3.Sub(t2)
		bodyAny += t2.Sub(t0)
		bodyDirect += t4.Sub(t2)
	}
	n := float64(b.N)
	b.ReportMetric(float64(viaAny.Nanoseconds())/n, "input-any-ns/op")
	b.ReportMetric(float64(direct.Nanoseconds())/n, "input-direct-ns/op")
	b.ReportMetric(float64(bodyAny.Nanoseconds())/n, "decision-any-ns/op")
	b.ReportMetric(float64(bodyDirect.Nanoseconds())/n, "decision-direct-ns/op")
}
