module local.shepherd/goclient

go 1.26.0

require (
	github.com/shepherd-dev/shepherd/gen/go v0.0.0
	google.golang.org/grpc v1.85.0
	google.golang.org/protobuf v1.36.12
)

require (
	golang.org/x/net v0.60.0 // indirect
	golang.org/x/sys v0.48.0 // indirect
	golang.org/x/text v0.42.0 // indirect
	google.golang.org/genproto/googleapis/rpc v0.0.0-20260817212433-ac3dfec99bb1 // indirect
)

// The generated code is not published anywhere: the test generates it from protos/ into gen/,
// where protoc-gen-go puts it by the protos' go_package, and gives it a go.mod of its own.
replace github.com/shepherd-dev/shepherd/gen/go => ./gen/github.com/shepherd-dev/shepherd/gen/go
