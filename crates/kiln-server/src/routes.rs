//! Every endpoint of the REST API, in one list: the router is built from it
//! (`app::router`), and so are the authorization test and the OpenAPI document.

use crate::endpoint::Endpoint;

pub fn endpoints() -> Vec<Endpoint> {
    let mut all = crate::api::endpoints();
    all.extend(crate::admin_api::endpoints());
    all.extend(crate::template_api::endpoints());
    all.extend(crate::spell_api::endpoints());
    all.extend(crate::secret_api::endpoints());
    all
}
