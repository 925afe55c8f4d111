module operator-tools/grpcurl

go 1.25.0

require github.com/fullstorydev/grpcurl v1.9.4
