-- wrk script of bench/webhooks.py: each pre-signed delivery of $BENCH_BODIES (one per line:
-- signature, a tab, the body) is sent once; thread k of $BENCH_THREADS sends lines k, k+n, ...
-- and stops after its share is answered. A connection that asks for more once the share is
-- all sent gets a GET (405, rejected before the view): counted apart, never a delivery twice.
-- wrk calls request() once on thread 0 before it runs (to check the request): that call
-- returns the first delivery without consuming it. Answers naming a duplicate are counted.
local threads = {}
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  local count = tonumber(os.getenv("BENCH_THREADS"))
  requests_ = {}
  local line_no = 0
  for line in io.lines(os.getenv("BENCH_BODIES")) do
    if line_no % count == tid then
      local tab = line:find("\t", 1, true)
      requests_[#requests_ + 1] = wrk.format("POST", nil, {
        ["Content-Type"] = "application/json",
        ["Stripe-Signature"] = line:sub(1, tab - 1),
      }, line:sub(tab + 1))
    end
    line_no = line_no + 1
  end
  filler_ = wrk.format("GET", nil, {}, nil)
  sent_, answered, statuses, fillers, duplicates = 0, 0, {}, 0, 0
  checking_ = tid == 0
end

function request()
  if checking_ then
    checking_ = false
    return requests_[1]
  end
  if sent_ < #requests_ then
    sent_ = sent_ + 1
    return requests_[sent_]
  end
  return filler_
end

function response(status, headers, body)
  if status == 405 then
    fillers = fillers + 1
    return
  end
  answered = answered + 1
  statuses[status] = (statuses[status] or 0) + 1
  if body:find("duplicate", 1, true) then
    duplicates = duplicates + 1
  end
  if answered >= #requests_ then
    -- wrk's main thread sleeps for -d regardless: the bench interrupts it on every DONE.
    io.write("DONE\n")
    io.flush()
    wrk.thread:stop()
  end
end

function done(summary, latency, _)
  local total, codes, filler_count, duplicate_count = 0, {}, 0, 0
  for _, thread in ipairs(threads) do
    total = total + thread:get("answered")
    filler_count = filler_count + thread:get("fillers")
    duplicate_count = duplicate_count + thread:get("duplicates")
    for status, n in pairs(thread:get("statuses")) do
      codes[#codes + 1] = string.format('"%d": %d', status, n)
    end
  end
  local errors = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "seconds": %.3f, "p50_us": %d, "p99_us": %d, "mean_us": %.1f, '
      .. '"statuses": {%s}, "fillers": %d, "duplicates": %d, "errors": %d}\n',
    total, summary.duration / 1e6, latency:percentile(50), latency:percentile(99), latency.mean,
    table.concat(codes, ", "), filler_count, duplicate_count,
    errors.connect + errors.read + errors.write + errors.timeout))
end
