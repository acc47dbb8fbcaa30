-- wrk script for loadtests/compare's pipelined load (HTTP/1.1 pipelining, as TechEmpower's
-- plaintext test sends it):
--
--     wrk -t1 -c32 -d5s --latency -s loadtests/pipeline.lua http://127.0.0.1:8000/ -- 16
--
-- Every write carries DEPTH (the argument after --, default 1) copies of the request wrk would
-- send; wrk then reads DEPTH responses, counting each, before it writes the next batch (and
-- reports one latency per batch, from its write to its last response). It checks statuses and
-- framing as usual. At the end the script prints how many requests it wrote:
--
--     Pipelined: 12345 batches of 16 requests written
--
-- which, set beside wrk's "N requests", shows requests a server left unanswered (by closing the
-- connection after answering fewer than DEPTH of them): a batch written just before the end is
-- still in flight, so up to connections x DEPTH requests are missing from any run.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   depth = tonumber(args[1]) or 1
   local batch = {}
   for i = 1, depth do
      batch[i] = wrk.format()
   end
   pipelined = table.concat(batch)
   batches = 0
end

-- Called for every batch written, by each thread in its own Lua state; and once more, in the
-- first thread's, when wrk starts and counts the requests a batch holds (done leaves that out).
function request()
   batches = batches + 1
   return pipelined
end

function done(summary, latency, requests)
   local written = -1
   for _, thread in ipairs(threads) do
      written = written + thread:get("batches")
   end
   io.write(string.format("Pipelined: %d batches of %d requests written\n", written,
                          threads[1] and threads[1]:get("depth") or 0))
end
