-- wrk script for tests/bench/ingress_bench.py: cycles through pre-signed raw HTTP requests.
-- The file named by the first script argument holds each request as a line with its byte length,
-- then exactly that many bytes. Each wrk thread starts at a random place in the pool.

local requests = {}
local index = 0

function init(args)
  local file = assert(io.open(args[1], "rb"))
  while true do
    local line = file:read("*l")
    if not line then break end
    requests[#requests + 1] = file:read(tonumber(line))
  end
  file:close()
  index = math.random(#requests)
end

function request()
  index = index % #requests + 1
  return requests[index]
end

-- One machine-readable line for the benchmark: counts, duration and latency percentiles in microseconds.
function done(summary, latency, _requests)
  local errors = summary.errors
  io.write(string.format(
    "WRK_RESULT requests=%d duration_us=%d non2xx=%d socket_errors=%d timeouts=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d\n",
    summary.requests, summary.duration, errors.status,
    errors.connect + errors.read + errors.write, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
