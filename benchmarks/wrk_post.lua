-- wrk script for benchmarks/throughput.py: POST pre-built requests, round-robin.
--   wrk -c 32 -t 2 -d 15s -s benchmarks/wrk_post.lua <url> -- <requests file>
-- The requests file holds one request per line, tab-separated: the JSON body, then
-- any number of "Header: value" fields.  No response() hook (it would make wrk parse
-- every response in Lua); done() prints one machine-readable RESULT line instead.
local threads = {}

function setup(thread)
  thread:set("offset", #threads * 101)
  table.insert(threads, thread)
end

function init(args)
  requests = {}
  for line in io.lines(args[1]) do
    local fields = {}
    for field in string.gmatch(line, "[^\t]+") do
      table.insert(fields, field)
    end
    local headers = { ["Content-Type"] = "application/json" }
    for i = 2, #fields do
      local name, value = string.match(fields[i], "^([^:]+):%s*(.*)$")
      headers[name] = value
    end
    table.insert(requests, wrk.format("POST", nil, headers, fields[1]))
  end
  n = offset % #requests
end

function request()
  n = n % #requests + 1
  return requests[n]
end

function done(summary)
  local e = summary.errors
  io.write(string.format("RESULT requests=%d duration_us=%d non2xx=%d connect=%d read=%d write=%d timeout=%d\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout))
end
