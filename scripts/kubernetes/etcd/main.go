// Command etcd is etcd's server, for the test cluster (the same entry point as etcd's own binary).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
