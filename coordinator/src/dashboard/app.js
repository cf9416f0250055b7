// The dashboard's only script: live counters from the job's event stream, and the action
// buttons, which call the same API as the CLI with the page's CSRF token.
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content || '';
  for (const b of document.querySelectorAll('button[data-action]')) {
    b.addEventListener('click', async () => {
      b.disabled = true;
      const r = await fetch(b.dataset.action, {
        method: 'POST', credentials: 'same-origin',
        headers: { 'x-csrf-token': csrf, 'content-type': 'application/json' }, body: '{}'
      });
      const out = document.getElementById('action-result');
      const body = await r.json().catch(() => ({}));
      // A rerun or rollback answers with its new job: go there.
      const made = body.job_id || (body.job && body.job.job_id);
      if (r.ok && made && !location.pathname.endsWith(made)) { location.href = '/ui/jobs/' + made; return; }
      if (r.ok) { location.reload(); return; }
      if (out) out.textContent = (body.error || r.statusText);
      b.disabled = false;
    });
  }
  const job = document.body.dataset.job;
  if (!job || !window.EventSource) return;
  const events = new EventSource('/v1/jobs/' + job + '/events');
  events.addEventListener('progress', (e) => {
    const p = JSON.parse(e.data);
    for (const [k, v] of Object.entries(p)) {
      const el = document.getElementById('count-' + k);
      if (el && typeof v !== 'object') el.textContent = v;
    }
    const targeted = p.targeted || 0;
    for (const s of document.querySelectorAll('#bar span[data-count]')) {
      const n = p[s.dataset.count] || 0;
      s.style.width = targeted ? (100 * n / targeted) + '%' : '0';
    }
  });
  events.addEventListener('state', (e) => {
    const el = document.getElementById('job-state');
    try { const s = JSON.parse(e.data); if (el && s.state) el.textContent = s.state; } catch (_) {}
  });
  events.addEventListener('finished', () => { events.close(); setTimeout(() => location.reload(), 300); });
})();
