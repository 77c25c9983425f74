// kinesalite (npm) on 127.0.0.1:<port>, its streams in LevelDB under <path>, with two of its
// departures from Kinesis put right, as the suite needs Kinesis's behaviour:
//
// - It rethrows a request's 'error' (index.js: `req.on('error', function(err) { throw err })`),
//   so a client killed mid-request (the crash tests SIGKILL workers mid-PutRecords) took the
//   whole server down. Kinesis shrugs such a request off, and so does this one.
// - GetShardIterator AT_TIMESTAMP never answers when no record of the shard arrived at or
//   after the time (its lazy stream's head() is never called). Kinesis answers with an
//   iterator at the tip. Here: the first record at or after the time (AT_SEQUENCE_NUMBER),
//   else LATEST.
//
// Usage: NODE_PATH=<node_modules> node kinesalite_serve.js <port> <path>
'use strict';

const port = parseInt(process.argv[2], 10);
const path = process.argv[3];

process.on('uncaughtException', (err) => {
  if (err && (err.code === 'ECONNRESET' || err.message === 'aborted')) {
    process.stderr.write('client aborted a request: ' + err.message + '\n');
    return;
  }
  process.stderr.write((err && err.stack || String(err)) + '\n');
  process.exit(1);
});

const db = require('kinesalite/db');
const actionPath = require.resolve('kinesalite/actions/getShardIterator');
const original = require(actionPath);

function atTimestamp(store, data, cb) {
  if (data.ShardIteratorType !== 'AT_TIMESTAMP' || data.Timestamp == null ||
      data.Timestamp * 1000 > Date.now()) {
    return original(store, data, cb);
  }
  let shardIx;
  try {
    shardIx = db.resolveShardId(data.ShardId).shardIx;
  } catch (e) {
    return original(store, data, cb);
  }
  let found = null;
  let done = false;
  const finish = () => {
    if (done) return;
    done = true;
    const rest = Object.assign({}, data);
    delete rest.Timestamp;
    if (found) {
      rest.ShardIteratorType = 'AT_SEQUENCE_NUMBER';
      rest.StartingSequenceNumber = found;
    } else {
      rest.ShardIteratorType = 'LATEST';
    }
    original(store, rest, cb);
  };
  const records = store.getStreamDb(data.StreamName).createReadStream(
    {gt: db.shardIxToHex(shardIx), lt: db.shardIxToHex(shardIx + 1)});
  records.on('data', (item) => {
    if (found === null && item.value.ApproximateArrivalTimestamp >= data.Timestamp) {
      found = item.key.split('/')[1];
      records.destroy();
      finish();
    }
  });
  records.on('end', finish);
  records.on('close', finish);
  records.on('error', (err) => {
    if (!done) {
      done = true;
      cb(err);
    }
  });
}
require.cache[actionPath].exports = atTimestamp;  // before kinesalite loads its actions

require('kinesalite')({createStreamMs: 0, deleteStreamMs: 0, updateStreamMs: 0,
                       shardLimit: 100000, path: path}).listen(port, '127.0.0.1', () => {
  process.stdout.write('listening\n');
});
